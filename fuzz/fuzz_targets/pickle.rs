//! PyTorch weight files (`pytorch_model.bin`, `.pth`), zip and legacy, through the
//! restricted unpickler. Never a panic, never unbounded memory, never code.
#![no_main]

mod common;

use ferrotune::formats::pickle::read_torch_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file("pytorch_model.bin", data);
    match read_torch_file(&path) {
        Ok(tensors) => {
            for (name, t) in &tensors {
                assert_eq!(t.elem_count(), t.dims().iter().product::<usize>(), "{name}");
            }
        }
        Err(e) => common::check_error(&e, &path),
    }
});
