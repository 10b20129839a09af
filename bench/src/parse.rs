//! Parsing the output of fio (`--output-format=json`), `quring bench` and `qemu-img bench`.

use std::collections::BTreeMap;

/// What one run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub iops: f64,
    pub lat_p50_us: Option<f64>,
    pub lat_p99_us: Option<f64>,
    pub lat_p999_us: Option<f64>,
    pub counters: Option<BTreeMap<String, u64>>,
}

/// fio's JSON report: IOPS summed over reads and writes of all jobs, completion latency
/// percentiles (of the direction that did I/O; the first job).
pub fn fio_json(text: &str) -> Result<Measured, String> {
    // fio may print warnings before the JSON document
    let start = text.find('{').ok_or("no JSON in fio output")?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| format!("fio JSON does not parse: {e}"))?;
    let jobs = v.get("jobs").and_then(|j| j.as_array()).ok_or("fio JSON has no jobs")?;
    if jobs.is_empty() {
        return Err("fio JSON has no jobs".into());
    }
    let mut m = Measured::default();
    let mut best_ios = 0u64;
    for job in jobs {
        if let Some(e) = job.get("error").and_then(|e| e.as_i64()).filter(|&e| e != 0) {
            return Err(format!("fio job error {e}"));
        }
        for dir in ["read", "write"] {
            let Some(d) = job.get(dir) else { continue };
            m.iops += d.get("iops").and_then(|x| x.as_f64()).unwrap_or(0.0);
            let ios = d.get("total_ios").and_then(|x| x.as_u64()).unwrap_or(0);
            if ios > best_ios {
                best_ios = ios;
                let pct = d.get("clat_ns").and_then(|c| c.get("percentile"));
                let p = |k: &str| pct.and_then(|p| p.get(k)).and_then(|x| x.as_f64()).map(|ns| ns / 1000.0);
                m.lat_p50_us = p("50.000000");
                m.lat_p99_us = p("99.000000");
                m.lat_p999_us = p("99.900000");
            }
        }
    }
    if best_ios == 0 {
        return Err("fio did no I/O".into());
    }
    Ok(m)
}

fn seconds_line(text: &str) -> Option<f64> {
    text.lines().find_map(|l| l.trim().strip_prefix("Run completed in ")?.strip_suffix(" seconds.")?.parse().ok())
}

/// `qemu-img bench`: "Run completed in X seconds." -> `count / X`.
pub fn qemu_bench(text: &str, count: u64) -> Result<Measured, String> {
    let secs = seconds_line(text).ok_or("no 'Run completed in X seconds.' line")?;
    if secs <= 0.0 {
        return Err(format!("run time {secs} s"));
    }
    Ok(Measured { iops: count as f64 / secs, ..Measured::default() })
}

/// `quring bench [--counters]`: the IOPS/latency line and the `name: value` counters.
pub fn quring_bench(text: &str) -> Result<Measured, String> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("IOPS:"))
        .ok_or("no 'IOPS: ...' line in quring bench output")?;
    let mut words = line.split_whitespace();
    let mut m = Measured::default();
    let mut iops = None;
    while let Some(w) = words.next() {
        let val = |w: Option<&str>| w.and_then(|s| s.parse::<f64>().ok());
        match w {
            "IOPS:" => iops = val(words.next()),
            "p50:" => m.lat_p50_us = val(words.next()),
            "p99:" => m.lat_p99_us = val(words.next()),
            "p99.9:" => m.lat_p999_us = val(words.next()),
            _ => {}
        }
    }
    m.iops = iops.ok_or_else(|| format!("unreadable IOPS line: {line}"))?;
    let after: Vec<&str> = text.lines().skip_while(|l| !l.trim_start().starts_with("IOPS:")).skip(1).collect();
    let mut counters = BTreeMap::new();
    for l in after {
        if let Some((k, v)) = l.split_once(':')
            && let Ok(v) = v.trim().parse::<u64>()
        {
            let k = k.trim();
            if !k.is_empty() && !k.contains(' ') {
                counters.insert(k.to_string(), v);
            }
        }
    }
    if !counters.is_empty() {
        m.counters = Some(counters);
    }
    Ok(m)
}

/// The engine counters that libquring_fio.so prints on fio's stderr when it closes an
/// image (`quring: PATH:` then `name: value` lines), summed over the images of the run;
/// None when there are none. They give the cells that run through fio the same device
/// bytes per guest byte as `quring bench --counters` (issue 15, item 2).
pub fn plugin_counters(stderr: &str) -> Option<BTreeMap<String, u64>> {
    let mut counters = BTreeMap::new();
    let mut inside = false;
    for l in stderr.lines() {
        let t = l.trim();
        if t.starts_with("quring: ") && t.ends_with(':') {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        match t.split_once(':') {
            Some((k, v))
                if !k.is_empty()
                    && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    && v.trim().parse::<u64>().is_ok() =>
            {
                *counters.entry(k.to_string()).or_insert(0) += v.trim().parse::<u64>().unwrap_or(0);
            }
            _ => inside = false,
        }
    }
    (!counters.is_empty()).then_some(counters)
}

/// The message to record for a failed command: its first `error:` line, else its last
/// non-empty stderr line (or stdout's).
pub fn failure_message(stderr: &str, stdout: &str, status: &str) -> String {
    let last = |t: &str| {
        let mut lines = t.lines().map(str::trim).filter(|l| !l.is_empty());
        let error = t.lines().map(str::trim).find(|l| l.to_ascii_lowercase().starts_with("error"));
        error.or_else(|| lines.next_back()).map(str::to_string)
    };
    match last(stderr).or_else(|| last(stdout)) {
        Some(l) => format!("{l} ({status})"),
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO: &str = r#"fio: some warning
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "x",
      "error" : 0,
      "read" : {
        "iops" : 240276.723277,
        "total_ios" : 240517,
        "clat_ns" : {
          "N" : 240517,
          "percentile" : {
            "1.000000" : 28288,
            "50.000000" : 64768,
            "99.000000" : 2473984,
            "99.900000" : 3850240
          }
        }
      },
      "write" : {
        "iops" : 0.000000,
        "total_ios" : 0,
        "clat_ns" : { "N" : 0 }
      }
    }
  ]
}
"#;

    #[test]
    fn fio_json_read_job() {
        let m = fio_json(FIO).unwrap();
        assert!((m.iops - 240276.723277).abs() < 1e-6);
        assert_eq!(m.lat_p50_us, Some(64.768));
        assert_eq!(m.lat_p99_us, Some(2473.984));
        assert_eq!(m.lat_p999_us, Some(3850.24));
        assert!(m.counters.is_none());
    }

    #[test]
    fn fio_json_errors() {
        assert!(fio_json("fio: engine not found").is_err());
        assert!(fio_json(r#"{"jobs": []}"#).is_err());
        assert!(fio_json(r#"{"jobs": [{"error": 5, "read": {"iops": 1, "total_ios": 1}}]}"#).is_err());
        assert!(fio_json(r#"{"jobs": [{"error": 0, "read": {"iops": 0, "total_ios": 0}}]}"#).is_err());
    }

    #[test]
    fn quring_output_with_counters() {
        let out =
            "Sending 20000 read requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 1052672)
Run completed in 0.119 seconds.
IOPS: 168284  latency p50: 92.5 us  p99: 3344.4 us  p99.9: 8618.0 us
         guest_reads: 20000
        guest_writes: 0
          l2_misses: 2
";
        let m = quring_bench(out).unwrap();
        assert_eq!(m.iops, 168284.0);
        assert_eq!(m.lat_p50_us, Some(92.5));
        assert_eq!(m.lat_p99_us, Some(3344.4));
        assert_eq!(m.lat_p999_us, Some(8618.0));
        let c = m.counters.unwrap();
        assert_eq!(c["guest_reads"], 20000);
        assert_eq!(c["l2_misses"], 2);
        assert_eq!(c.len(), 3);
        assert!(quring_bench("Run completed in 1 seconds.\n").is_err());
        assert!(quring_bench("IOPS: 5 latency p50: 1 us\n").unwrap().counters.is_none());
    }

    #[test]
    fn plugin_counters_from_fio_stderr() {
        let err = "fio: some warning: 3
quring: /x/a.qcow2:
         guest_writes: 10
          write_bytes: 40960
     data_write_bytes: 40960
fio: done
quring: /x/b.qcow2:
         guest_writes: 2
";
        let c = plugin_counters(err).unwrap();
        assert_eq!(c["guest_writes"], 12);
        assert_eq!(c["write_bytes"], 40960);
        assert_eq!(c["data_write_bytes"], 40960);
        assert_eq!(c.len(), 3, "the fio line before the first image is not a counter: {c:?}");
        assert!(plugin_counters("fio: nothing here: 5\n").is_none());
    }

    #[test]
    fn qemu_output() {
        let out =
            "Sending 20000 read requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 1052672)
Run completed in 0.100 seconds.
";
        let m = qemu_bench(out, 20000).unwrap();
        assert!((m.iops - 200000.0).abs() < 1e-6);
        assert_eq!(m.lat_p50_us, None);
        assert!(qemu_bench("Sending...\n", 1).is_err());
    }

    #[test]
    fn failure_messages() {
        assert_eq!(
            failure_message("quring: unsupported: writes are not implemented yet\n\n", "Sending", "exit status 1"),
            "quring: unsupported: writes are not implemented yet (exit status 1)"
        );
        assert_eq!(failure_message("", "", "signal 9"), "signal 9");
        let clap = "error: unrecognized subcommand 'create'\n\nUsage: quring <COMMAND>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            failure_message(clap, "", "exit status: 2"),
            "error: unrecognized subcommand 'create' (exit status: 2)"
        );
    }
}
