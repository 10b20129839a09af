//! Replays the committed fuzz corpus (fuzz/corpus/<target>/) and crash reproducers
//! (fuzz/artifacts-regressions/<target>/) through the fuzz targets' own bodies
//! (fuzz/harness.rs, shared with fuzz/fuzz_targets/*.rs). Errors are fine; a panic fails the
//! test, naming every input that panicked. An input that runs over a minute aborts the run.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TARGETS: [&str; 4] = ["header", "decode", "image", "cli"];

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join(target);
    let mut v: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

/// Runs every input of `kind` for every target; returns (inputs run, failures).
fn replay(kind: &str) -> (usize, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("fuzz.qcow2");
    // Watchdog: a hang in one input aborts with its name instead of stalling the suite.
    let current: Arc<Mutex<Option<(PathBuf, Instant)>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (current, done) = (current.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if let Some((p, t)) = &*current.lock().unwrap()
                    && t.elapsed() > Duration::from_secs(60)
                {
                    eprintln!("fuzz regression input {} runs for over 60 s: hang", p.display());
                    std::process::abort();
                }
            }
        })
    };
    let mut n = 0;
    let mut failures = Vec::new();
    for target in TARGETS {
        for path in inputs(kind, target) {
            let data = std::fs::read(&path).unwrap();
            *current.lock().unwrap() = Some((path.clone(), Instant::now()));
            let r = catch_unwind(AssertUnwindSafe(|| match target {
                "header" => harness::fuzz_header(&data),
                "decode" => harness::fuzz_decode(&data),
                "image" => harness::fuzz_image(&data, &scratch),
                "cli" => harness::fuzz_cli(&data, &scratch),
                _ => unreachable!(),
            }));
            *current.lock().unwrap() = None;
            n += 1;
            if let Err(p) = r {
                failures.push(format!("{target}: {}: {}", path.display(), panic_message(&*p)));
            }
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watchdog.join().unwrap();
    (n, failures)
}

#[test]
fn corpus_replays_without_panics() {
    let (n, failures) = replay("corpus");
    eprintln!("replayed {n} corpus inputs");
    assert!(n > 0, "no corpus under fuzz/corpus/");
    assert!(failures.is_empty(), "{} corpus input(s) panicked:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn crash_reproducers_do_not_panic() {
    let (n, failures) = replay("artifacts-regressions");
    eprintln!("replayed {n} crash reproducers");
    assert!(failures.is_empty(), "{} reproducer(s) still panic:\n{}", failures.len(), failures.join("\n"));
}
