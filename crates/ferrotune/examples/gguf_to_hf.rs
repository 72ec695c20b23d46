//! Converts a GGUF file to a Hugging Face model directory, for `scripts/check-gguf`; with
//! `--tokenize FILE` (a JSON array of strings) also prints one JSON line, the token ids
//! ferrotune's tokenizer (`data::tokenizer::load_tokenizer` on the new directory) gives
//! each text, without special-token handling beyond what the tokenizer itself adds.
//!
//! `cargo run --release --example gguf_to_hf -- MODEL.gguf OUT_DIR [--tokenize TEXTS.json]`
//!
//! Prints the conversion's wall time and peak memory (`ru_maxrss`) on stderr.

use std::path::PathBuf;
use std::time::Instant;

fn main() -> ferrotune::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 && !(args.len() == 4 && args[2] == "--tokenize") {
        eprintln!("usage: gguf_to_hf MODEL.gguf OUT_DIR [--tokenize TEXTS.json]");
        std::process::exit(2);
    }
    let (gguf, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let t = Instant::now();
    ferrotune::formats::gguf::to_hf_dir(&gguf, &out)?;
    // Safety: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    eprintln!(
        "converted {} -> {} in {:.2} s, peak RSS {:.0} MB",
        gguf.display(),
        out.display(),
        t.elapsed().as_secs_f64(),
        ru.ru_maxrss as f64 / 1024.0
    );
    if let Some(texts) = args.get(3) {
        let path = PathBuf::from(texts);
        let text = std::fs::read_to_string(&path).map_err(|e| ferrotune::Error::io(&path, e))?;
        let texts: Vec<String> = serde_json::from_str(&text)
            .map_err(|e| ferrotune::Error::file(&path, e.to_string()))?;
        let tok = ferrotune::data::tokenizer::load_tokenizer(&out, 1 << 20)?;
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| {
                tok.encode(t.as_str(), true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| ferrotune::Error::Msg(format!("tokenizer: {e}")))
            })
            .collect::<ferrotune::Result<_>>()?;
        println!("{}", serde_json::to_string(&ids).expect("ids serialise"));
    }
    Ok(())
}
