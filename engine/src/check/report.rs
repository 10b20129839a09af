//! The result of a check and its output: qemu-img's human text and JSON.

use std::fmt::Write as _;

/// The result of a check, with the fields of QEMU's `ImageCheck`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors that may corrupt data (refcount too low, bad entries...).
    pub corruptions: u64,
    /// Clusters whose stored refcount is higher than their references.
    pub leaks: u64,
    /// Errors that kept parts of the check from running.
    pub check_errors: u64,
    /// Guest clusters: ceil(virtual size / cluster size).
    pub total_clusters: u64,
    /// Guest clusters with a host cluster (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not following the previous one on the host.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster that is referenced or has a refcount.
    pub image_end_offset: u64,
    /// Refcounts raised and COPIED flags corrected by a repair (`check -r all`).
    pub corruptions_fixed: u64,
    /// Refcounts lowered by a repair (`check -r leaks`).
    pub leaks_fixed: u64,
    /// One line per problem, in QEMU's wording (qemu-img prints these on stderr); at most
    /// [`MAX_MESSAGES`] (a hostile image can hold millions of problems: the counts above
    /// stay exact, the lines past the limit are only counted in `messages_omitted`).
    pub messages: Vec<String>,
    /// Problem lines not kept in `messages`.
    pub messages_omitted: u64,
}

/// The most problem lines a [`CheckReport`] keeps.
pub const MAX_MESSAGES: usize = 10_000;

impl CheckReport {
    /// qemu-img check's exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// What `qemu-img check --output=json` prints on stdout (key order included: QEMU's
    /// QDict hash order), with a trailing newline. Zero-valued optional fields are left out.
    pub fn to_json(&self, filename: &str) -> String {
        enum V<'a> {
            N(u64),
            S(&'a str),
        }
        let opt = |v: u64| if v != 0 { Some(V::N(v)) } else { None };
        let fields: [(&str, Option<V>); 12] = [
            ("image-end-offset", opt(self.image_end_offset)),
            ("compressed-clusters", opt(self.compressed_clusters)),
            ("total-clusters", opt(self.total_clusters)),
            ("corruptions", opt(self.corruptions)),
            ("corruptions-fixed", opt(self.corruptions_fixed)),
            ("check-errors", Some(V::N(self.check_errors))),
            ("leaks", opt(self.leaks)),
            ("leaks-fixed", opt(self.leaks_fixed)),
            ("allocated-clusters", opt(self.allocated_clusters)),
            ("filename", Some(V::S(filename))),
            ("format", Some(V::S("qcow2"))),
            ("fragmented-clusters", opt(self.fragmented_clusters)),
        ];
        let mut out = String::from("{\n");
        let mut first = true;
        for (k, v) in fields {
            let Some(v) = v else { continue };
            if !first {
                out.push_str(",\n");
            }
            first = false;
            let _ = match v {
                V::N(n) => write!(out, "    \"{k}\": {n}"),
                V::S(s) => write!(out, "    \"{k}\": \"{}\"", json_escape(s)),
            };
        }
        out.push_str("\n}\n");
        out
    }

    /// What qemu-img check -r prints on stdout (human format) after repairing something,
    /// before it checks the image again.
    pub fn repaired_human(&self) -> String {
        format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            self.leaks_fixed, self.corruptions_fixed
        )
    }

    /// The summary qemu-img check prints on stdout (human format).
    pub fn summary_human(&self) -> String {
        let mut out = String::new();
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            out.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                let _ = write!(
                    out,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks > 0 {
                let _ = write!(
                    out,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors > 0 {
                let _ = write!(out, "\n{} internal errors have occurred during the check.\n", self.check_errors);
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            let _ = writeln!(
                out,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a,
            );
        }
        if self.image_end_offset != 0 {
            let _ = writeln!(out, "Image end offset: {}", self.image_end_offset);
        }
        out
    }

    /// qemu-img check's human output as a terminal shows it (`2>&1`): the problem messages
    /// (stderr, printed during the check) followed by the stdout summary.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        for m in &self.messages {
            out.push_str(m);
            out.push('\n');
        }
        if let Some(l) = self.omitted_line() {
            out.push_str(&l);
            out.push('\n');
        }
        out.push_str(&self.summary_human());
        out
    }

    /// The line that stands for the problem lines not kept, if any.
    pub fn omitted_line(&self) -> Option<String> {
        (self.messages_omitted > 0).then(|| format!("({} more problem lines not shown)", self.messages_omitted))
    }

    /// Records one problem line (bounded, see [`CheckReport::messages`]).
    pub(super) fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        } else {
            self.messages_omitted += 1;
        }
    }

    pub(super) fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        self.note(msg);
    }
}

/// Escapes a string the way QEMU's JSON writer does.
pub(super) fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04X}");
                }
            }
            c => out.push(c),
        }
    }
    out
}
