//! Every recipe shipped in `recipes/` reads and validates.

use std::path::Path;

#[test]
fn shipped_recipes_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    // Recipe paths are relative to the repository root (where ferrotune is run from); a
    // GGUF model is converted when its recipe is read, so it must be found. The one test
    // of this binary: changing the directory races with nothing.
    std::env::set_current_dir(dir.join("..")).unwrap();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // A recipe whose model is a GGUF file is converted when read: it needs the asset.
            let text = std::fs::read_to_string(&path).unwrap();
            let root = dir.join("..");
            let gguf = text.lines().find_map(|l| {
                let v = l
                    .strip_prefix("model_name_or_path = \"")?
                    .split('"')
                    .next()?;
                v.ends_with(".gguf").then(|| root.join(v))
            });
            if let Some(g) = gguf.filter(|g| !g.exists()) {
                eprintln!("{}: skipped, {} is absent", path.display(), g.display());
                continue;
            }
            ferrotune::TrainConfig::load(&path, &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "only {n} recipes found in {}", dir.display());
}
