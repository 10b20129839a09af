//! The engine's layers, checked: every `crate::` path in `engine/src` (outside comments)
//! must name a module of the same layer or of a lower one. Bottom up:
//!
//! 1. `error`, `counters` (leaf types)
//! 2. `format` (pure on-disk codecs)
//! 3. `io` (buffers, files, the synchronous ring, locks, hooks)
//! 4. `check` (`qemu-img check`'s verdicts over on-disk metadata)
//! 5. `meta` (cache, refcounts, overlap map, rebuild)
//! 6. `image` (the shared `Image`)
//! 7. `queue` (per-thread queues and request state machines)
//!
//! `lib.rs` sits on top. The same list is in the crate documentation (`engine/src/lib.rs`)
//! and in `docs/architecture.md`; this test keeps all three true.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const LAYERS: &[&[&str]] =
    &[&["error", "counters"], &["format"], &["io"], &["check"], &["meta"], &["image"], &["queue"]];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level modules named by `crate::` paths in the code of `text` (comments skipped).
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name.chars().next().unwrap().is_ascii_lowercase() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn imports_run_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut seen = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if first == "lib" {
            continue;
        }
        let Some(own) = rank(&first) else {
            violations.push(format!("{}: module `{first}` is in no layer of this test's list", rel.display()));
            continue;
        };
        seen += 1;
        let text = std::fs::read_to_string(f).unwrap();
        for m in referenced(&text) {
            match rank(&m) {
                Some(r) if r > own => {
                    violations.push(format!("{}: `{first}` uses `crate::{m}`, a higher layer", rel.display()))
                }
                Some(_) => {}
                None if ["Error", "Result"].contains(&m.as_str()) => {}
                None => violations.push(format!("{}: `crate::{m}` is in no layer", rel.display())),
            }
        }
    }
    assert!(seen > 30, "only {seen} engine files found under {}", src.display());
    assert!(violations.is_empty(), "imports against the layers:\n{}", violations.join("\n"));
}
