//! Scenario files (`tests/scenarios/*.scn`): hand-written differential plans, one step
//! per line, compared after every step.
//!
//! ```text
//! # comment
//! scenario NAME [clusters=16k,64k,2M]   a new plan (expanded once per listed cluster size)
//! corrupt                               outcomes compared in kind (corrupt-image plans)
//! raw NAME SIZE                         a raw file
//! qcow2 NAME SIZE [-o OPTS] [-b FILE -F FMT]
//!                                       a qcow2 file; the last one is the image under test
//! prep NAME CMD                         a qemu-io command on NAME while building
//! snapshot NAME SNAP                    qemu-img snapshot -c SNAP NAME while building
//! prepimg NAME ARGS                     qemu-img ARGS while building, `@` standing for NAME
//! poke NAME OFFSET HEXBYTES             patch bytes of NAME while building
//! step CMD [; CMD ...]                  one quring io / qemu-io process with these commands
//! ro CMD                                the same, both sides read-only
//! either step|ro ...                    corrupt plans: this step may differ in kind (a
//!                                       documented difference); the copies are not compared
//!                                       after a difference
//! both CMD                              qemu-io on both copies (e.g. write -c)
//! img ARGS                              qemu-img ARGS IMG on both copies
//! batch N CMD                           one step of N commands, `{i}` = 0..N-1 in CMD
//! repeat N CMD                          N steps, `{i}` = 0..N-1 in CMD
//! ```
//!
//! Numbers may be sums of products like `3c+16s+1h-2*512`: `c` is the cluster size of
//! the image under test, `s` its subcluster size, `h` half a subcluster, `k`/`M`/`G`
//! binary units, `0x` hex. In `-o` options, `{c}` stands for the cluster size. A `-P`
//! pattern is left as written.

use super::*;

/// One evaluated term sum.
pub fn eval(expr: &str, c: u64, s: u64) -> Result<u64, String> {
    let mut total: i128 = 0;
    let mut sign = 1i128;
    let mut cur = String::new();
    let mut terms = Vec::new();
    for ch in expr.chars() {
        if (ch == '+' || ch == '-') && !cur.is_empty() {
            terms.push((sign, std::mem::take(&mut cur)));
            sign = if ch == '+' { 1 } else { -1 };
        } else {
            cur.push(ch);
        }
    }
    terms.push((sign, cur));
    for (sign, t) in terms {
        let mut prod: i128 = 1;
        for f in t.split('*') {
            prod *= factor(f, expr, c, s)?;
        }
        total += sign * prod;
    }
    u64::try_from(total).map_err(|_| format!("'{expr}' is negative"))
}

fn factor(t: &str, expr: &str, c: u64, s: u64) -> Result<i128, String> {
    if let Some(h) = t.strip_prefix("0x") {
        return i128::from_str_radix(h, 16).map_err(|_| format!("bad hex '{t}' in '{expr}'"));
    }
    let digits: String = t.chars().take_while(|d| d.is_ascii_digit()).collect();
    let unit = &t[digits.len()..];
    let n: i128 = if digits.is_empty() { 1 } else { digits.parse().map_err(|_| format!("bad '{t}' in '{expr}'"))? };
    let m: u64 = match unit {
        "" => 1,
        "k" | "K" => KIB,
        "M" => MIB,
        "G" => GIB,
        "T" => 1024 * GIB,
        "c" => c,
        "s" => s,
        "h" => s / 2,
        _ => return Err(format!("unknown unit '{unit}' in '{expr}'")),
    };
    Ok(n * m as i128)
}

/// Evaluates the number-like words of a command (every word starting with a digit,
/// except the word after `-P`).
fn eval_cmd(cmd: &str, c: u64, s: u64) -> Result<String, String> {
    let mut out = Vec::new();
    let mut after_p = false;
    for w in cmd.split_whitespace() {
        if !after_p && w.starts_with(|ch: char| ch.is_ascii_digit()) {
            out.push(eval(w, c, s)?.to_string());
        } else {
            out.push(w.to_string());
        }
        after_p = w == "-P";
    }
    Ok(out.join(" "))
}

fn hex_bytes(h: &str) -> Result<Vec<u8>, String> {
    let h = h.trim_start_matches("0x");
    if !h.len().is_multiple_of(2) {
        return Err(format!("odd hex string '{h}'"));
    }
    (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).map_err(|e| e.to_string())).collect()
}

/// Parses a scenario file into plans (one per scenario and cluster size).
pub fn parse(text: &str, file: &str) -> Result<Vec<Plan>, String> {
    // Split into scenarios first: cluster sizes must be known before numbers are read.
    // (line number, header, numbered lines)
    type Block = (usize, String, Vec<(usize, String)>);
    let mut blocks: Vec<Block> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("scenario ") {
            blocks.push((i + 1, rest.trim().to_string(), Vec::new()));
        } else if let Some(b) = blocks.last_mut() {
            b.2.push((i + 1, line.to_string()));
        } else {
            return Err(format!("{file}:{}: a line before the first 'scenario'", i + 1));
        }
    }
    let mut plans = Vec::new();
    for (lno, head, lines) in blocks {
        let mut words = head.split_whitespace();
        let name = words.next().ok_or(format!("{file}:{lno}: scenario without a name"))?.to_string();
        let mut clusters: Vec<Option<u64>> = vec![None];
        for w in words {
            if let Some(v) = w.strip_prefix("clusters=") {
                clusters = v.split(',').map(|x| eval(x, 0, 0).map(Some)).collect::<Result<_, _>>()?;
            } else {
                return Err(format!("{file}:{lno}: unknown scenario option '{w}'"));
            }
        }
        for cl in clusters {
            let p = expand(&name, cl, &lines).map_err(|e| format!("{file}: scenario {name}: {e}"))?;
            plans.push(p);
        }
    }
    Ok(plans)
}

fn opt_value(opts: &str, key: &str) -> Option<String> {
    opts.split(',').find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

fn expand(name: &str, cluster: Option<u64>, lines: &[(usize, String)]) -> Result<Plan, String> {
    let sub_c = |o: &str| match cluster {
        Some(c) => o.replace("{c}", &c.to_string()),
        None => o.to_string(),
    };
    // The image under test: the last qcow2 line decides c and s.
    let (mut c, mut s) = (64 * KIB, 64 * KIB);
    for (_, l) in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.first() == Some(&"qcow2") {
            let opts =
                w.iter().position(|x| *x == "-o").and_then(|i| w.get(i + 1)).map(|o| sub_c(o)).unwrap_or_default();
            c = opt_value(&opts, "cluster_size").map(|v| eval(&v, 0, 0)).transpose()?.unwrap_or(64 * KIB);
            s = if opt_value(&opts, "extended_l2").as_deref() == Some("on") { c / 32 } else { c };
        }
    }
    let mut plan = Plan {
        name: match cluster {
            Some(cs) => format!("{name} (cluster_size={cs})"),
            None => name.to_string(),
        },
        desc: String::new(),
        files: Vec::new(),
        steps: Vec::new(),
        corrupt: false,
        quring_opts: Vec::new(),
        data_file: None,
    };
    for (lno, l) in lines {
        let err = |e: String| format!("line {lno}: {e}");
        let (kw, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
        let rest = rest.trim();
        let file_mut = |plan: &mut Plan, n: &str| -> Result<usize, String> {
            plan.files.iter().position(|f| f.name == n).ok_or(format!("line {lno}: no file '{n}'"))
        };
        match kw {
            "corrupt" => plan.corrupt = true,
            "either" => {
                if !plan.corrupt {
                    return Err(err("'either' only in corrupt plans".into()));
                }
                plan.steps.push(Step::Either);
                let (kw2, rest2) = rest.split_once(' ').ok_or(err("either step|ro CMD".into()))?;
                match kw2 {
                    "ro" => plan.steps.push(Step::Ro(eval_cmd(rest2, c, s).map_err(err)?)),
                    "step" => {
                        for cmd in rest2.split(';') {
                            plan.steps.push(Step::Io(eval_cmd(cmd.trim(), c, s).map_err(err)?));
                        }
                        plan.steps.push(Step::Reopen);
                    }
                    x => return Err(err(format!("either {x}: expected step or ro"))),
                }
            }
            "raw" => {
                let w: Vec<&str> = rest.split_whitespace().collect();
                if w.len() != 2 {
                    return Err(err("raw NAME SIZE".into()));
                }
                let size = eval(w[1], c, s).map_err(err)?;
                plan.files.push(FileSpec { name: w[0].into(), kind: FileKind::Raw, size, actions: vec![] });
            }
            "qcow2" => {
                let w: Vec<&str> = rest.split_whitespace().collect();
                if w.len() < 2 {
                    return Err(err("qcow2 NAME SIZE [-o OPTS] [-b FILE -F FMT]".into()));
                }
                let size = eval(w[1], c, s).map_err(err)?;
                let (mut opts, mut b, mut bf) = (String::new(), None, None);
                let mut i = 2;
                while i < w.len() {
                    let v = w.get(i + 1).ok_or(err(format!("'{}' needs a value", w[i])))?;
                    match w[i] {
                        "-o" => opts = sub_c(v),
                        "-b" => b = Some(v.to_string()),
                        "-F" => bf = Some(v.to_string()),
                        x => return Err(err(format!("unknown qcow2 option '{x}'"))),
                    }
                    i += 2;
                }
                let backing = match (b, bf) {
                    (Some(b), Some(f)) => Some((b, f)),
                    (None, None) => None,
                    _ => return Err(err("-b and -F go together".into())),
                };
                plan.files.push(FileSpec {
                    name: w[0].into(),
                    kind: FileKind::Qcow2 { opts, backing },
                    size,
                    actions: vec![],
                });
            }
            "prep" | "snapshot" | "poke" | "prepimg" => {
                let (n, arg) = rest.split_once(' ').ok_or(err(format!("{kw} NAME ...")))?;
                let fi = file_mut(&mut plan, n)?;
                let a = match kw {
                    "prep" => Action::Io(eval_cmd(arg, c, s).map_err(err)?),
                    "snapshot" => Action::Snapshot(arg.trim().to_string()),
                    "prepimg" => {
                        Action::Img(eval_cmd(arg, c, s).map_err(err)?.split_whitespace().map(str::to_string).collect())
                    }
                    _ => {
                        let (off, hex) = arg.trim().split_once(' ').ok_or(err("poke NAME OFFSET HEX".into()))?;
                        Action::Poke(eval(off, c, s).map_err(err)?, hex_bytes(hex.trim()).map_err(err)?)
                    }
                };
                plan.files[fi].actions.push(a);
            }
            "step" => {
                for cmd in rest.split(';') {
                    plan.steps.push(Step::Io(eval_cmd(cmd.trim(), c, s).map_err(err)?));
                }
                plan.steps.push(Step::Reopen);
            }
            "batch" | "repeat" => {
                let (n, cmd) = rest.split_once(' ').ok_or(err(format!("{kw} N CMD")))?;
                let n: u64 = n.parse().map_err(|_| err(format!("bad count '{n}'")))?;
                for i in 0..n {
                    for one in cmd.split(';') {
                        let one = one.trim().replace("{i}", &i.to_string());
                        plan.steps.push(Step::Io(eval_cmd(&one, c, s).map_err(err)?));
                    }
                    if kw == "repeat" {
                        plan.steps.push(Step::Reopen);
                    }
                }
                if kw == "batch" {
                    plan.steps.push(Step::Reopen);
                }
            }
            "ro" => plan.steps.push(Step::Ro(eval_cmd(rest, c, s).map_err(err)?)),
            "both" => plan.steps.push(Step::Both(eval_cmd(rest, c, s).map_err(err)?)),
            "img" => plan
                .steps
                .push(Step::Img(eval_cmd(rest, c, s).map_err(err)?.split_whitespace().map(str::to_string).collect())),
            x => return Err(err(format!("unknown keyword '{x}'"))),
        }
    }
    match plan.files.last() {
        Some(FileSpec { kind: FileKind::Qcow2 { .. }, .. }) => {}
        _ => return Err("the last file must be the qcow2 image under test".into()),
    }
    plan.desc = format!("scenario {} (cluster {c}, subcluster {s})", plan.name);
    Ok(plan)
}

/// Every plan of every `*.scn` file in `tests/scenarios` whose name starts with `prefix`.
pub fn load(prefix: &str) -> Vec<Plan> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "scn") && p.file_name().unwrap().to_str().unwrap().starts_with(prefix)
        })
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no scenario files {prefix}*.scn in {}", dir.display());
    let mut out = Vec::new();
    for n in names {
        let text = std::fs::read_to_string(&n).unwrap();
        out.extend(parse(&text, &n.display().to_string()).unwrap_or_else(|e| panic!("{e}")));
    }
    out
}
