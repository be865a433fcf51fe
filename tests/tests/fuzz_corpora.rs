//! Replays every input the fuzzers kept (`fuzz/corpus/<target>/`) and every crash they found
//! (`fuzz/artifacts/<target>/`) through the same target bodies, on stable: what `make fuzz`
//! found once stays fixed.

use std::path::Path;

#[test]
fn every_kept_fuzz_input_still_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in vmm::fuzz::TARGETS {
        let mut replayed = 0;
        for kind in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                let result = std::panic::catch_unwind(|| target(&bytes));
                assert!(result.is_ok(), "{name}: {} fails again", path.display());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "fuzz/corpus/{name} is empty");
    }
}
