//! Replays every kept fuzz input (`fuzz/regressions/<target>/*`, crashers and interesting cases
//! found by fuzzing) and the built-in seeds through its target, on every `cargo test`.

use std::path::Path;

#[test]
fn every_kept_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let mut replayed = 0;
    for (name, target) in cubby_fuzz::TARGETS {
        let dir = root.join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.expect("readable directory").path();
            let data = std::fs::read(&path).expect("readable input");
            eprintln!("{name}: {}", path.display());
            target(&data);
            replayed += 1;
        }
    }
    for (name, data) in cubby_fuzz::seeds() {
        let (_, target) =
            cubby_fuzz::TARGETS.iter().find(|(n, _)| *n == name).expect("a known target");
        target(&data);
        replayed += 1;
    }
    assert!(replayed >= cubby_fuzz::seeds().len());
}

#[test]
fn row_01_02_every_target_survives_truncations_and_bit_flips_of_its_seeds() {
    // BAD_INPUTS rows 1 and 2 without a fuzzer: every prefix of every seed, and every single
    // bit flip of the short ones.
    for (name, seed) in cubby_fuzz::seeds() {
        let (_, target) =
            cubby_fuzz::TARGETS.iter().find(|(n, _)| *n == name).expect("a known target");
        for end in 0..seed.len() {
            target(&seed[..end]);
        }
        if seed.len() <= 512 {
            for bit in 0..seed.len() * 8 {
                let mut flipped = seed.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                target(&flipped);
            }
        }
    }
}
