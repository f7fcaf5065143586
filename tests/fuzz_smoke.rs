//! Smoke pass over the fuzz targets on the stable toolchain (CI has no
//! nightly and no cargo-fuzz). The target bodies are the fuzz crate's own
//! (`fuzz/src/harness.rs`, included below), so the checks are the same ones
//! libFuzzer runs: every entry of `fuzz/corpus/<target>/` is replayed, then a
//! bounded number of inputs derived from it (bytes flipped, inserted, cut,
//! two entries spliced) and of random bytes go through each target. What
//! only the libFuzzer build checks: the usage tap's heap bound (it needs the
//! fuzz crate's counting allocator).
//!
//! `FUZZ_SMOKE_CASES` sets the generated inputs per target (default 1000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../fuzz/src/harness.rs"]
mod harness;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 6] = [
    ("usage_tap", |data| harness::usage_tap(data, None)),
    ("chunk_filter", harness::chunk_filter),
    ("config", harness::config),
    ("pricing", harness::pricing),
    ("attribution", harness::attribution),
    ("route", harness::route),
];

/// The corpus of `target`, in file-name order.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    entries
        .into_iter()
        // A running fuzzer may remove an entry between the listing and the
        // read.
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            Some((name, std::fs::read(&p).ok()?))
        })
        .collect()
}

#[test]
fn every_corpus_entry_passes_its_target() {
    for (target, run) in TARGETS {
        let entries = corpus(target);
        assert!(
            entries.iter().any(|(name, _)| name.starts_with("seed-")),
            "{target}: no seed in the corpus"
        );
        for (name, data) in &entries {
            if catch_unwind(AssertUnwindSafe(|| run(data))).is_err() {
                panic!("{target}: corpus entry {name} fails (message above)");
            }
        }
    }
}

/// How an input is derived from the corpus.
#[derive(Debug, Clone)]
enum Derived {
    /// Random bytes.
    Random(Vec<u8>),
    /// An entry with bytes overwritten, bytes inserted, cut at the end and
    /// another entry's head appended.
    Mutated {
        entry: prop::sample::Index,
        flips: Vec<(prop::sample::Index, u8)>,
        inserts: Vec<(prop::sample::Index, Vec<u8>)>,
        cut: Option<prop::sample::Index>,
        splice: Option<(prop::sample::Index, prop::sample::Index)>,
    },
}

fn derived() -> impl Strategy<Value = Derived> {
    let index = any::<prop::sample::Index>;
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Derived::Random),
        3 => (
            index(),
            proptest::collection::vec((index(), any::<u8>()), 0..16),
            proptest::collection::vec(
                (index(), proptest::collection::vec(any::<u8>(), 1..8)),
                0..4
            ),
            proptest::option::of(index()),
            proptest::option::of((index(), index())),
        )
            .prop_map(|(entry, flips, inserts, cut, splice)| Derived::Mutated {
                entry,
                flips,
                inserts,
                cut,
                splice,
            }),
    ]
}

fn build(d: &Derived, corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    match d {
        Derived::Random(bytes) => bytes.clone(),
        Derived::Mutated {
            entry,
            flips,
            inserts,
            cut,
            splice,
        } => {
            let mut data = corpus[entry.index(corpus.len())].1.clone();
            for (at, byte) in flips {
                if !data.is_empty() {
                    let i = at.index(data.len());
                    data[i] = *byte;
                }
            }
            for (at, bytes) in inserts {
                let i = at.index(data.len() + 1);
                data.splice(i..i, bytes.iter().copied());
            }
            if let Some(at) = cut {
                data.truncate(at.index(data.len() + 1));
            }
            if let Some((other, len)) = splice {
                let other = &corpus[other.index(corpus.len())].1;
                data.extend_from_slice(&other[..len.index(other.len() + 1)]);
            }
            data
        }
    }
}

/// Keeps a failing input where a fuzz run would (`fuzz/artifacts/`, not
/// committed) so that it can be replayed with the fuzz binary or added to
/// the corpus as a regression seed.
fn save(target: &str, data: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/artifacts")
        .join(target);
    let path = dir.join(format!("smoke-{:016x}", h.finish()));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, data)) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("(not saved: {e})"),
    }
}

#[test]
fn derived_inputs_pass_every_target() {
    let cases = std::env::var("FUZZ_SMOKE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    for (target, run) in TARGETS {
        let entries = corpus(target);
        // Deterministic: a CI failure reproduces locally.
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::deterministic_rng(RngAlgorithm::ChaCha),
        );
        let result = runner.run(&derived(), |d| {
            let data = build(&d, &entries);
            let outcome = catch_unwind(AssertUnwindSafe(|| run(&data)));
            prop_assert!(outcome.is_ok(), "{target} fails (message above)");
            Ok(())
        });
        if let Err(TestError::Fail(why, minimal)) = result {
            let saved = save(target, &build(&minimal, &entries));
            panic!("{target}: {why}; smallest failing input saved as {saved}");
        }
    }
}
