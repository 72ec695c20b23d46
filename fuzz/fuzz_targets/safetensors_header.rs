//! safetensors files: the header reader behind `ferrotune inspect`, and the full read
//! the model loader does (header, then every tensor's bytes).
#![no_main]

mod common;

use candle_core::Device;
use ferrotune::formats::safetensors::read_safetensors;
use ferrotune::formats::safetensors::safetensors_shapes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file("model.safetensors", data);
    if let Err(e) = safetensors_shapes(&path) {
        common::check_error(&e, &path);
    }
    match read_safetensors(&path, &Device::Cpu) {
        Ok(tensors) => {
            for (name, t) in &tensors {
                // Every tensor read is whole: its element count matches its shape.
                assert_eq!(t.elem_count(), t.dims().iter().product::<usize>(), "{name}");
            }
        }
        Err(e) => common::check_error(&e, &path),
    }
});
