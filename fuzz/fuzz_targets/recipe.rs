//! The recipe parser: TOML text, then `--set` overrides (one per line after a NUL byte).
//! A recipe that parses must survive the round trip through `recipe.resolved.toml`
//! (what `--resume` reads back) unchanged.
#![no_main]

mod common;

use std::path::Path;

use ferrotune::TrainConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (recipe, sets) = text.split_once('\0').unwrap_or((text, ""));
    let overrides: Vec<String> = sets.lines().map(str::to_string).collect();
    let path = Path::new("recipe.toml");
    match TrainConfig::from_toml_str(recipe, path, &overrides) {
        Ok(cfg) => {
            let resolved = cfg.to_toml();
            let again =
                TrainConfig::from_toml_str(&resolved, Path::new("recipe.resolved.toml"), &[])
                    .unwrap_or_else(|e| {
                        panic!("resolved recipe does not read back: {e}\n{resolved}")
                    });
            assert_eq!(again.to_toml(), resolved, "round trip changed the recipe");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error of more than one line: {msg:?}");
        }
    }
});
