//! `formats::pickle`: reading PyTorch weight files without running them.
//!
//! - Fixtures made by `tests/fixtures/pickle/make_fixtures.py` (torch): a state dict in the
//!   zip and the legacy format, with non-contiguous, offset, shared, expanded, 0-d and
//!   empty tensors in nine dtypes, compared exactly with torch's own contiguous copies.
//! - Malicious and malformed files, built here byte by byte (and one made by Python's
//!   `pickle`): each must be refused with a message naming the global or the problem,
//!   without side effects and without panicking.
//! - The EfficientNet-Lite0 checkpoint (legacy format, 50 non-contiguous tensors) when
//!   `scripts/fetch-assets --only efficientnet` has fetched it, against values from
//!   `tests/fixtures/pickle/efficientnet_reference.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use ferrotune::formats::pickle::{convert_to_safetensors, read_torch_file};
use safetensors::{SafeTensors, View};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pickle")
        .join(name)
}

/// The state dict's names, in the order `make_fixtures.py` builds it.
const NAMES: [&str; 20] = [
    "linear.weight",
    "linear.bias",
    "transposed",
    "conv.weight",
    "view.offset",
    "view.step",
    "tied.a",
    "tied.b",
    "expanded",
    "scalar",
    "empty",
    "half",
    "bf16",
    "double",
    "long",
    "int",
    "short",
    "byte",
    "bool",
    "bn.num_batches_tracked",
];

/// `expected.safetensors` as (dtype, shape, bytes) by name.
fn expected() -> HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixture("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

/// Asserts that `got` holds exactly the expected tensor `want` (dtype, shape, bytes).
fn assert_same(name: &str, got: &Tensor, want: &(safetensors::Dtype, Vec<usize>, Vec<u8>)) {
    assert_eq!(View::dtype(&got), want.0, "{name}: dtype");
    assert_eq!(got.dims(), want.1.as_slice(), "{name}: shape");
    assert!(
        View::data(&got).as_ref() == want.2.as_slice(),
        "{name}: values differ"
    );
}

fn check_state_dict_fixture(file: &str) {
    let got = read_torch_file(&fixture(file)).unwrap();
    let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, NAMES, "{file}: names in state-dict order");
    let want = expected();
    for (name, t) in &got {
        assert_same(name, t, &want[name]);
    }
    // Spot checks in plain numbers (the byte comparison above is the real test).
    let by_name: HashMap<_, _> = got.into_iter().collect();
    let tr = by_name["transposed"].to_vec2::<f32>().unwrap();
    let base_t = by_name["view.offset"].to_vec2::<f32>().unwrap();
    // view.offset = base[1:, 2:5] and transposed = base.t(): base[1][2] twice.
    assert_eq!(tr[2][1], base_t[0][0]);
    assert_eq!(
        by_name["long"].to_vec2::<i64>().unwrap(),
        vec![vec![0, 7], vec![-1, -(1 << 62)], vec![1 << 40, 3]]
    );
    assert_eq!(
        by_name["bool"].to_vec2::<u8>().unwrap(),
        vec![vec![1, 0, 1], vec![0, 1, 1]]
    );
    assert_eq!(
        by_name["expanded"].to_vec2::<f32>().unwrap(),
        vec![vec![1.5, -2.0]; 3]
    );
    assert_eq!(by_name["scalar"].to_scalar::<f32>().unwrap(), 0.25);
    assert_eq!(by_name["empty"].dims(), &[0, 3]);
    assert_eq!(by_name["half"].dtype(), DType::F16);
    assert_eq!(
        by_name["bn.num_batches_tracked"]
            .to_scalar::<i64>()
            .unwrap(),
        42
    );
}

#[test]
fn zip_format_state_dict_matches_torch() {
    check_state_dict_fixture("zip_state_dict.pt");
}

#[test]
fn legacy_format_state_dict_matches_torch() {
    check_state_dict_fixture("legacy_state_dict.pth");
}

#[test]
fn nested_checkpoint_yields_its_state_dict() {
    // {"epoch", "lr", "state_dict": {"w", "p" (an nn.Parameter)}, "optimizer": {...}}
    let got = read_torch_file(&fixture("nested_checkpoint.pt")).unwrap();
    let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["w", "p"]);
    let want = expected();
    assert_same("w", &got[0].1, &want["nested.w"]);
    assert_same("p", &got[1].1, &want["nested.p"]);
}

#[test]
fn convert_writes_an_equal_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    for input in ["zip_state_dict.pt", "legacy_state_dict.pth"] {
        let n = convert_to_safetensors(&fixture(input), &out).unwrap();
        assert_eq!(n, NAMES.len());
        let bytes = std::fs::read(&out).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let want = expected();
        assert_eq!(st.len(), NAMES.len());
        for name in NAMES {
            let v = st.tensor(name).unwrap();
            let w = &want[name];
            assert_eq!(
                (v.dtype(), v.shape(), v.data()),
                (w.0, w.1.as_slice(), w.2.as_slice()),
                "{name}"
            );
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
    // Written under a temporary name and renamed: nothing else is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["model.safetensors"]);
}

#[test]
fn convert_of_a_bad_input_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let err = convert_to_safetensors(&fixture("os_system.pth"), &out).unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------------------
// Hand-built pickles
// ---------------------------------------------------------------------------------------

/// Pickle bytes for a str (BINUNICODE).
fn s(text: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((text.len() as u32).to_le_bytes());
    v.extend(text.as_bytes());
    v
}

/// Pickle bytes for a GLOBAL.
fn global(module: &str, name: &str) -> Vec<u8> {
    format!("c{module}\n{name}\n").into_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A legacy torch file around `main` (the pickled object), with `keys` as the storage
/// key list and `tail` as the storages' bytes.
fn legacy(main: &[u8], keys: &[&str], tail: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."); // magic number
    v.extend(b"\x80\x02M\xe9\x03."); // protocol version 1001
    v.extend(b"\x80\x02}q\x00("); // sys_info
    v.extend(s("little_endian"));
    v.extend(b"\x88u.");
    v.extend(main);
    v.extend(b"\x80\x02](");
    for k in keys {
        v.extend(s(k));
    }
    v.extend(b"e.");
    v.extend(tail);
    v
}

/// A pickle of `{"w": _rebuild_tensor_v2(storage "0" of `numel` floats, offset, size, stride)}`.
fn tensor_pickle(numel: u32, offset: u32, size: &[u32], stride: &[u32]) -> Vec<u8> {
    let mut v = b"\x80\x02}(".to_vec();
    v.extend(s("w"));
    v.extend(global("torch._utils", "_rebuild_tensor_v2"));
    v.extend(b"((");
    v.extend(s("storage"));
    v.extend(global("torch", "FloatStorage"));
    v.extend(s("0"));
    v.extend(s("cpu"));
    v.push(b'J');
    v.extend(numel.to_le_bytes());
    v.extend(b"NtQJ");
    v.extend(offset.to_le_bytes());
    v.push(b'(');
    for d in size {
        v.push(b'J');
        v.extend(d.to_le_bytes());
    }
    v.extend(b"t(");
    for d in stride {
        v.push(b'J');
        v.extend(d.to_le_bytes());
    }
    v.extend(b"t\x89}tRu.");
    v
}

/// A legacy file holding storage "0" of `count` floats 0, 1, 2, ... (`numel` declared
/// in the pickle) and one tensor over it.
fn tensor_file(numel: u32, count: u64, offset: u32, size: &[u32], stride: &[u32]) -> Vec<u8> {
    let mut tail = count.to_le_bytes().to_vec();
    for i in 0..count.min(64) {
        tail.extend((i as f32).to_le_bytes());
    }
    legacy(&tensor_pickle(numel, offset, size, stride), &["0"], &tail)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Reads `bytes` as a file and returns the error message (panicking if it loads).
fn refused(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "model.bin", bytes);
    match read_torch_file(&p) {
        Ok(t) => panic!(
            "loaded {} tensors from a file that must be refused",
            t.len()
        ),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with(&p.display().to_string()),
                "names the file: {msg}"
            );
            assert!(!msg.contains('\n'), "one line: {msg}");
            msg
        }
    }
}

/// A zip-format torch file with `pkl` as data.pkl and the given storages.
fn zip_file(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("model/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    z.start_file("model/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    for (k, data) in storages {
        z.start_file(format!("model/data/{k}"), opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
    buf.into_inner()
}

#[test]
fn hand_built_tensor_files_load() {
    // The builders above make valid files: a 2x3 transposed view of 0..6.
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "ok.pth",
        &tensor_file(6, 6, 0, &[3, 2], &[1, 3]),
    );
    let got = read_torch_file(&p).unwrap();
    assert_eq!(got[0].0, "w");
    assert_eq!(
        got[0].1.to_vec2::<f32>().unwrap(),
        vec![vec![0.0, 3.0], vec![1.0, 4.0], vec![2.0, 5.0]]
    );
    let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let pkl = tensor_pickle(6, 1, &[2, 2], &[3, 1]);
    let p = write(dir.path(), "ok.pt", &zip_file(&pkl, &[("0", &data)]));
    let got = read_torch_file(&p).unwrap();
    assert_eq!(
        got[0].1.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 2.0], vec![4.0, 5.0]]
    );
}

/// `<global>("touch <marker>")` as a REDUCE, the classic payload.
fn reduce_payload(g: &[u8], marker: &Path) -> Vec<u8> {
    let cmd = format!("touch {}", marker.display());
    cat(&[b"\x80\x02", g, &s(&cmd), b"\x85R."])
}

#[test]
fn os_system_is_refused_and_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let payload = reduce_payload(&global("os", "system"), &marker);

    // As the object of a legacy file, as a bare pickle, and as a zip's data.pkl.
    for bytes in [
        legacy(&payload, &[], &[]),
        payload.clone(),
        zip_file(&payload, &[]),
    ] {
        let msg = refused(&bytes);
        assert!(
            msg.contains(
                "refused to load: the pickle calls os.system (only tensor rebuilding is allowed)"
            ),
            "{msg}"
        );
    }
    // Inside a state dict, after a valid tensor.
    let mut sd = tensor_pickle(6, 0, &[6], &[1]);
    sd.truncate(sd.len() - 2); // drop "u." to add one more item
    sd.extend(s("evil"));
    sd.extend(&payload[2..payload.len() - 1]);
    sd.extend(b"u.");
    let msg = refused(&legacy(&sd, &["0"], &[0; 32]));
    assert!(msg.contains("os.system"), "{msg}");
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn python_pickled_os_system_is_refused() {
    // Made by Python's pickle (make_fixtures.py): on Linux os.system pickles as posix.system.
    let marker = Path::new("/tmp/ferrotune-pickle-fixture-pwned");
    let _ = std::fs::remove_file(marker);
    let err = read_torch_file(&fixture("os_system.pth"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refused to load: the pickle calls posix.system"),
        "{err}"
    );
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn other_dangerous_globals_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    for (module, name) in [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("__builtin__", "eval"),
        ("subprocess", "Popen"),
        ("subprocess", "check_output"),
        ("posix", "system"),
        ("nt", "system"),
        ("pickle", "loads"),
        ("torch", "load"),
        ("torch.nn.modules.linear", "Linear"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("collections", "defaultdict"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ] {
        let payload = reduce_payload(&global(module, name), &marker);
        let msg = refused(&legacy(&payload, &[], &[]));
        assert!(
            msg.contains(&format!(
                "the pickle calls {module}.{name} (only tensor rebuilding"
            )),
            "{msg}"
        );
    }
    // Protocol 4's STACK_GLOBAL names the callable with strings from the stack.
    let payload = cat(&[
        b"\x80\x04",
        &s("subprocess"),
        &s("Popen"),
        b"\x93",
        &s("touch"),
        b"\x85R.",
    ]);
    let msg = refused(&legacy(&payload, &[], &[]));
    assert!(msg.contains("calls subprocess.Popen"), "{msg}");
    // INST names and calls a class in one opcode.
    let msg = refused(&legacy(b"\x80\x02(ios\nsystem\n.", &[], &[]));
    assert!(msg.contains("calls os.system"), "{msg}");
    // The copyreg extension registry could name anything.
    let msg = refused(&legacy(b"\x80\x02\x82\x01)R.", &[], &[]));
    assert!(msg.contains("extension registry"), "{msg}");
    // A name with control characters is shown escaped, on one line.
    let msg = refused(&legacy(
        &cat(&[b"\x80\x04", &s("os\n\x1b[2J"), &s("system"), b"\x93."]),
        &[],
        &[],
    ));
    assert!(msg.contains("os\\n\\u{1b}[2J.system"), "{msg}");
    assert!(!marker.exists());
}

#[test]
fn nested_torch_load_is_refused() {
    // torch.storage._load_from_bytes(b"...") would run torch.load on embedded bytes.
    let payload = cat(&[
        b"\x80\x02}(",
        &s("w"),
        &global("torch.storage", "_load_from_bytes"),
        b"C\x04PK\x03\x04\x85R",
        b"u.",
    ]);
    for bytes in [legacy(&payload, &[], &[]), zip_file(&payload, &[])] {
        let msg = refused(&bytes);
        assert!(
            msg.contains("refused to load: the pickle calls torch.storage._load_from_bytes (a nested torch.load"),
            "{msg}"
        );
    }
}

#[test]
fn allowed_callables_cannot_be_misused() {
    // OrderedDict applied to a storage type, a storage type called, REDUCE on a string.
    for main in [
        cat(&[b"\x80\x02", &global("torch", "FloatStorage"), b")R."]),
        cat(&[b"\x80\x02", &global("torch", "Tensor"), b")R."]),
        cat(&[b"\x80\x02", &s("os.system"), b")R."]),
        cat(&[
            b"\x80\x02",
            &global("torch._utils", "_rebuild_tensor_v2"),
            b")R.",
        ]),
        cat(&[b"\x80\x02", &global("torch", "FloatStorage"), b")\x81."]),
        cat(&[b"\x80\x02]", &global("torch", "FloatStorage"), b"b."]),
    ] {
        let msg = refused(&legacy(&main, &[], &[]));
        assert!(msg.contains("malformed pickle"), "{msg}");
    }
}

#[test]
fn unsupported_tensor_types_are_named() {
    let main = cat(&[b"\x80\x02", &global("torch", "ComplexFloatStorage"), b"."]);
    let msg = refused(&legacy(&main, &[], &[]));
    assert!(
        msg.contains("unsupported tensor type torch.ComplexFloatStorage"),
        "{msg}"
    );
    // int8 exists in torch but not in candle: named with the tensor.
    let mut main = tensor_pickle(4, 0, &[4], &[1]);
    let at = main.windows(12).position(|w| w == b"FloatStorage").unwrap();
    main.splice(at..at + 12, b"CharStorage".iter().copied());
    let mut tail = 4u64.to_le_bytes().to_vec();
    tail.extend([1, 2, 3, 4]);
    let msg = refused(&legacy(&main, &["0"], &tail));
    assert!(
        msg.contains("field `w`: int8 tensors are not supported"),
        "{msg}"
    );
}

#[test]
fn truncated_files_are_errors_not_panics() {
    for name in ["legacy_state_dict.pth", "zip_state_dict.pt"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cut.bin");
        for len in 0..bytes.len() {
            std::fs::write(&p, &bytes[..len]).unwrap();
            assert!(
                read_torch_file(&p).is_err(),
                "{name} cut at {len} bytes loaded"
            );
        }
    }
    let msg = refused(&std::fs::read(fixture("legacy_state_dict.pth")).unwrap()[..2000]);
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn corrupted_bytes_never_panic() {
    // Every single-byte corruption of the legacy fixture either loads or is an error.
    let bytes = std::fs::read(fixture("legacy_state_dict.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.pth");
    let mut loaded = 0;
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            std::fs::write(&p, &b).unwrap();
            if read_torch_file(&p).is_ok() {
                loaded += 1;
            }
        }
    }
    // Corrupt tensor data still loads (nothing checks it); structure must not.
    assert!(loaded > 0 && loaded < 3 * bytes.len());
}

#[test]
fn huge_declared_lengths_are_refused_without_allocating() {
    // A string declaring 4 GB, an 8-byte length of 2^63, a LONG4 of 2 GB.
    for main in [
        b"\x80\x02X\xf0\xff\xff\xff abc.".to_vec(),
        b"\x80\x04\x8d\x00\x00\x00\x00\x00\x00\x00\x80abc.".to_vec(),
        b"\x80\x02\x8b\xff\xff\xff\x7fabc.".to_vec(),
        b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xffabc.".to_vec(),
    ] {
        let msg = refused(&legacy(&main, &[], &[]));
        assert!(msg.contains("truncated or corrupt pickle"), "{msg}");
    }
    // A storage declaring 2^64-1 elements.
    let msg = refused(&tensor_file(6, u64::MAX, 0, &[6], &[1])[..]);
    assert!(
        msg.contains("storage `0` declares 18446744073709551615 float32 elements"),
        "{msg}"
    );
    // A tensor reaching past its storage, by offset or by stride.
    let msg = refused(&tensor_file(6, 6, 1, &[6], &[1]));
    assert!(
        msg.contains(
            "field `w`: offset 1, size [6] and stride [1] reach past its storage of 6 elements"
        ),
        "{msg}"
    );
    let msg = refused(&tensor_file(6, 6, 0, &[2, 3], &[3, 2]));
    assert!(msg.contains("reach past its storage"), "{msg}");
    // A storage shorter than the pickle declares.
    let msg = refused(&tensor_file(60, 6, 0, &[6], &[1]));
    assert!(
        msg.contains("fewer than its declared 60 float32 elements"),
        "{msg}"
    );
    // Stride 0 repeating one element 2^62 times: refused by the unpacking budget before
    // any allocation.
    let big = i32::MAX as u32;
    let msg = refused(&tensor_file(1, 1, 0, &[big, big], &[0, 0]));
    assert!(msg.contains("bytes once unpacked"), "{msg}");
    // Nesting a million tuples deep costs nothing (no recursion anywhere).
    let mut deep = b"\x80\x02)".to_vec();
    deep.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    deep.push(b'.');
    let msg = refused(&legacy(&deep, &[], &[]));
    assert!(msg.contains("no state dict"), "{msg}");
}

#[test]
fn memo_references_cannot_amplify_memory() {
    // A list of 100,000 pairs, then `OrderedDict(list)` applied 10,000 times through the
    // memo (6 bytes each): copied naively, 16 GB. Refused once the copies pass a
    // multiple of the input.
    let mut main = b"\x80\x02".to_vec();
    main.extend(global("collections", "OrderedDict"));
    main.extend(b"q\x00](");
    for _ in 0..100_000 {
        main.extend(b"K\x01K\x02\x86");
    }
    main.extend(b"e\x85q\x010");
    for _ in 0..10_000 {
        main.extend(b"h\x00h\x01R0");
    }
    main.extend(b"N.");
    let msg = refused(&legacy(&main, &[], &[]));
    assert!(msg.contains("copies more than"), "{msg}");

    // A state dict naming one tensor 200,000 times through the memo.
    let mut sd = tensor_pickle(6, 0, &[6], &[1]);
    let at = sd.windows(3).position(|w| w == b"tRu").unwrap() + 2;
    sd.splice(at..at, b"q\x09".iter().copied()); // memoize the tensor
    sd.truncate(sd.len() - 2);
    for i in 0..200_000u32 {
        sd.extend(s(&format!("t{i}")));
        sd.extend(b"h\x09");
    }
    sd.extend(b"u.");
    let mut tail = 6u64.to_le_bytes().to_vec();
    tail.extend([0; 24]);
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "many.pth", &legacy(&sd, &["0"], &tail));
    // Legitimately many small tensors (within both budgets): it loads.
    let got = read_torch_file(&p).unwrap();
    assert_eq!(got.len(), 200_001);
    // The same name twice is refused, not silently resolved.
    let dup = {
        let mut d = tensor_pickle(6, 0, &[6], &[1]);
        let at = d.windows(3).position(|w| w == b"tRu").unwrap() + 2;
        d.splice(at..at, b"q\x09".iter().copied());
        d.truncate(d.len() - 2);
        d.extend(s("w"));
        d.extend(b"h\x09u.");
        d
    };
    let msg = refused(&legacy(&dup, &["0"], &tail));
    assert!(msg.contains("names tensor `w` twice"), "{msg}");
}

#[test]
fn other_files_are_refused_clearly() {
    let msg = refused(b"hello, world");
    assert!(msg.contains("not a PyTorch weight file"), "{msg}");
    let msg = refused(b"");
    assert!(msg.contains("not a PyTorch weight file"), "{msg}");
    // A pickle without the torch magic number.
    let msg = refused(b"\x80\x02}q\x00.");
    assert!(msg.contains("no torch magic number"), "{msg}");
    // A zip that is not a torch checkpoint.
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    z.start_file(
        "readme.txt",
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
    )
    .unwrap();
    z.finish().unwrap();
    let msg = refused(&buf.into_inner());
    assert!(msg.contains("no <folder>/data.pkl"), "{msg}");
    // A state dict whose storage is missing from the zip.
    let pkl = tensor_pickle(6, 0, &[6], &[1]);
    let msg = refused(&zip_file(&pkl, &[]));
    assert!(msg.contains("storage `0` is missing"), "{msg}");
    // A file holding no dict of tensors.
    let msg = refused(&legacy(b"\x80\x02}(X\x01\x00\x00\x00aK\x01u.", &[], &[]));
    assert!(msg.contains("no state dict"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// EfficientNet-Lite0
// ---------------------------------------------------------------------------------------

fn efficientnet() -> Option<PathBuf> {
    let dir = std::env::var_os("FERROTUNE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let p = dir.join("efficientnet-lite0/efficientnet-lite0-57934424.pth");
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} not found (run scripts/fetch-assets --only efficientnet)",
            p.display()
        );
        None
    }
}

/// sum(x[i] * (i % 7 + 1)) over the row-major flattened tensor, in f64: unlike a plain
/// sum it changes when elements come out in the wrong order.
fn checksum(t: &Tensor) -> f64 {
    let v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    v.iter()
        .enumerate()
        .map(|(i, x)| x * ((i % 7) + 1) as f64)
        .sum()
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-6 + 1e-9 * want.abs()
}

/// The tensors torch stores non-contiguously: name, shape, first four values of the
/// contiguous tensor, checksum (from efficientnet_reference.py).
#[rustfmt::skip]
const NON_CONTIGUOUS: [(&str, &[usize], [f32; 4], f64); 50] = [
    ("_conv_stem.weight", &[32, 3, 3, 3], [-1.1103361, -1.3087704, -0.010156915, 0.92081195], -108.16233640880091),
    ("_blocks.0._depthwise_conv.weight", &[32, 1, 3, 3], [-0.16969286, 0.21025741, -0.03239037, -0.12258807], 40.171540550887585),
    ("_blocks.0._project_conv.weight", &[16, 32, 1, 1], [-0.040664077, -0.04025399, 0.11548647, -0.10687995], 25.20316065987572),
    ("_blocks.1._expand_conv.weight", &[96, 16, 1, 1], [0.2541788, 0.5232763, -0.27862358, -0.29728875], 67.86549696116708),
    ("_blocks.1._depthwise_conv.weight", &[96, 1, 3, 3], [0.18779422, 0.36236292, 0.19271614, 0.2532476], 99.22971715964377),
    ("_blocks.1._project_conv.weight", &[24, 96, 1, 1], [0.07189542, 0.29248556, 0.046985343, 0.023217056], 28.625229487661272),
    ("_blocks.2._expand_conv.weight", &[144, 24, 1, 1], [-0.07062568, 0.049647007, 0.010532878, 0.15357497], -26.041948438622057),
    ("_blocks.2._depthwise_conv.weight", &[144, 1, 3, 3], [0.078833535, -0.24183644, -0.010318577, -0.1935256], 13.8051404543221),
    ("_blocks.2._project_conv.weight", &[24, 144, 1, 1], [-0.05942017, 0.14647523, 0.021854974, 0.3125658], -41.21631817170419),
    ("_blocks.3._expand_conv.weight", &[144, 24, 1, 1], [0.10237003, 0.25327143, 0.41032958, 0.33149806], -82.93200342776254),
    ("_blocks.3._depthwise_conv.weight", &[144, 1, 5, 5], [0.013516143, 0.3486138, 0.40673947, 0.10342704], 95.05758355837315),
    ("_blocks.3._project_conv.weight", &[40, 144, 1, 1], [-0.14720137, 0.090665095, 0.20128128, -0.17867696], 196.1884366176091),
    ("_blocks.4._expand_conv.weight", &[240, 40, 1, 1], [-0.17471379, 0.092536904, 0.0037300512, -0.015728086], -2.311747056344757),
    ("_blocks.4._depthwise_conv.weight", &[240, 1, 5, 5], [-0.034546018, -0.09827489, 0.14863361, -0.0073154704], 33.69127685856074),
    ("_blocks.4._project_conv.weight", &[40, 240, 1, 1], [0.21838841, 0.20771486, -0.27641633, 0.046633482], -63.456615101807984),
    ("_blocks.5._expand_conv.weight", &[240, 40, 1, 1], [0.18642257, -0.092457056, 0.026087388, 0.19883445], 261.10990372719243),
    ("_blocks.5._depthwise_conv.weight", &[240, 1, 3, 3], [-0.26096612, -0.02482742, 0.13330022, -0.046679944], 384.72008198685944),
    ("_blocks.5._project_conv.weight", &[80, 240, 1, 1], [-0.09008628, 0.049974356, 0.32226405, 0.027073968], 30.491648891358636),
    ("_blocks.6._expand_conv.weight", &[480, 80, 1, 1], [0.08287862, -0.0735543, 0.013452259, -0.05554548], 34.77518533465627),
    ("_blocks.6._depthwise_conv.weight", &[480, 1, 3, 3], [0.08059201, 0.12556538, 0.062919706, 0.13092704], 66.77396067650989),
    ("_blocks.6._project_conv.weight", &[80, 480, 1, 1], [0.15917082, 0.03900972, -0.028448142, -0.0767184], -84.20690432790434),
    ("_blocks.7._expand_conv.weight", &[480, 80, 1, 1], [0.05393087, 0.110409915, -0.02630727, 0.046341307], 40.3950032920402),
    ("_blocks.7._depthwise_conv.weight", &[480, 1, 3, 3], [-0.016602822, -0.039326012, -0.01984632, -0.045530915], 261.9121490418911),
    ("_blocks.7._project_conv.weight", &[80, 480, 1, 1], [0.20732135, -0.07760498, 0.14961948, 0.051682085], -24.16335674317088),
    ("_blocks.8._expand_conv.weight", &[480, 80, 1, 1], [0.21925715, -0.035987347, -0.30960843, -0.15993033], 150.08323198847938),
    ("_blocks.8._depthwise_conv.weight", &[480, 1, 5, 5], [0.0130214095, -0.0052986965, -0.03889776, -0.019204617], 198.37988004821818),
    ("_blocks.8._project_conv.weight", &[112, 480, 1, 1], [-0.35276842, -0.07294018, -0.105718896, 0.1769912], 87.94445566885406),
    ("_blocks.9._expand_conv.weight", &[672, 112, 1, 1], [0.0073255077, -0.0036388412, 0.06411516, -0.011026666], -709.5993470925459),
    ("_blocks.9._depthwise_conv.weight", &[672, 1, 5, 5], [0.061836746, 0.10797319, 0.083587095, 0.09482559], 1023.6532037382713),
    ("_blocks.9._project_conv.weight", &[112, 672, 1, 1], [-0.041255355, 0.0035701431, -0.10390518, 0.093106486], 236.24021893079043),
    ("_blocks.10._expand_conv.weight", &[672, 112, 1, 1], [0.05947113, 0.1063004, -0.037350427, -0.09782471], -609.2258611626166),
    ("_blocks.10._depthwise_conv.weight", &[672, 1, 5, 5], [-0.007101625, 0.027562588, 0.029089972, -0.003961563], 1099.779013303807),
    ("_blocks.10._project_conv.weight", &[112, 672, 1, 1], [-0.019662771, -0.07573974, -0.061201572, 0.019481868], 112.76459176278877),
    ("_blocks.11._expand_conv.weight", &[672, 112, 1, 1], [-0.05351176, 0.07478509, -0.12970446, -0.045585915], 312.5873613052463),
    ("_blocks.11._depthwise_conv.weight", &[672, 1, 5, 5], [0.05529985, 0.14793077, 0.14654224, 0.047802478], 2033.960988545441),
    ("_blocks.11._project_conv.weight", &[192, 672, 1, 1], [0.14259909, -0.030850962, 0.12644002, 0.12376425], 442.19995032700535),
    ("_blocks.12._expand_conv.weight", &[1152, 192, 1, 1], [0.019902907, 0.052891515, -0.0104699265, 0.0038392246], -619.0425468823378),
    ("_blocks.12._depthwise_conv.weight", &[1152, 1, 5, 5], [0.021715522, 0.03181857, 0.024964854, 0.059617065], 884.0084701941814),
    ("_blocks.12._project_conv.weight", &[192, 1152, 1, 1], [-0.06578787, 0.10591693, 0.10977414, -0.04752305], 534.9488168780354),
    ("_blocks.13._expand_conv.weight", &[1152, 192, 1, 1], [-0.019612735, 0.027502656, 0.021775302, 0.11904955], -920.0711250517279),
    ("_blocks.13._depthwise_conv.weight", &[1152, 1, 5, 5], [0.0074971765, 0.014232606, -0.021439716, -0.003117364], 1722.4715604781086),
    ("_blocks.13._project_conv.weight", &[192, 1152, 1, 1], [-0.039797433, 0.0015500113, 0.038632035, -0.025941245], 452.19482121407054),
    ("_blocks.14._expand_conv.weight", &[1152, 192, 1, 1], [-0.11353061, 0.006770473, 0.15410323, -0.030008378], -1194.3588154494319),
    ("_blocks.14._depthwise_conv.weight", &[1152, 1, 5, 5], [0.04488361, 0.044974357, 0.037353173, 0.00419195], 2096.94338178623),
    ("_blocks.14._project_conv.weight", &[192, 1152, 1, 1], [-0.115412965, -0.034696937, -0.007375568, -0.03714578], 434.4132702005372),
    ("_blocks.15._expand_conv.weight", &[1152, 192, 1, 1], [0.0052268375, -0.09883484, 0.026559811, 0.2542128], -1446.9188590871345),
    ("_blocks.15._depthwise_conv.weight", &[1152, 1, 3, 3], [-0.21690078, -0.024567127, 0.26405096, 0.013299018], 900.3280845070258),
    ("_blocks.15._project_conv.weight", &[320, 1152, 1, 1], [0.037382703, 0.029342927, -0.028256789, -0.13034168], 124.12893240978883),
    ("_conv_head.weight", &[1280, 320, 1, 1], [0.0605572, -0.077026635, 0.01708867, 0.12104651], -161.35395589857944),
    ("_fc.weight", &[1000, 1280], [-0.045610435, -0.09470871, -0.056841467, 0.06823881], -1848.465090003945),
];

/// The checksum summed over all 296 tensors (from efficientnet_reference.py).
const TOTAL_CHECKSUM: f64 = 1692595.7887436468;

#[test]
fn efficientnet_lite0_legacy_checkpoint() {
    let Some(path) = efficientnet() else { return };
    let start = std::time::Instant::now();
    let tensors = read_torch_file(&path).unwrap();
    eprintln!("read {} tensors in {:.2?}", tensors.len(), start.elapsed());
    assert_eq!(tensors.len(), 296);
    assert_eq!(tensors[0].0, "_conv_stem.weight");
    assert_eq!(tensors[295].0, "_fc.bias");
    let params: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    assert_eq!(params, 4_694_073);
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    for (name, shape, first, sum) in NON_CONTIGUOUS {
        let t = by_name[name];
        assert_eq!(t.dims(), shape, "{name}: shape");
        assert_eq!(t.dtype(), DType::F32, "{name}: dtype");
        let flat = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat[..4], first, "{name}: first values");
        let got = checksum(t);
        assert!(close(got, sum), "{name}: checksum {got} != {sum}");
    }
    let total: f64 = tensors.iter().map(|(_, t)| checksum(t)).sum();
    assert!(
        close(total, TOTAL_CHECKSUM),
        "total checksum {total} != {TOTAL_CHECKSUM}"
    );
    assert_eq!(by_name["_bn1.num_batches_tracked"].dtype(), DType::I64);

    // Converted to safetensors, the same tensors come back.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("efficientnet-lite0.safetensors");
    assert_eq!(convert_to_safetensors(&path, &out).unwrap(), 296);
    let back = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(back.len(), 296);
    for (name, t) in &tensors {
        let b = &back[name];
        assert_eq!(b.dims(), t.dims(), "{name}");
        assert!(
            View::data(&b).as_ref() == View::data(t).as_ref(),
            "{name}: values differ after conversion"
        );
    }
}
