//! qemu-img's progress output (`-p`): "    (12.34/100%)\r" lines on stdout.

use std::io::Write;

/// qemu-img's progress line on stdout: "    (12.34/100%)\r", printed at every 1% step and
/// at the end followed by a newline.
pub struct Progress {
    last: f64,
}

impl Progress {
    /// Prints 0% and starts counting.
    pub fn start() -> Progress {
        let p = Progress { last: 0.0 };
        p.print(0.0);
        p
    }

    fn print(&self, v: f64) {
        let mut o = std::io::stdout().lock();
        let _ = write!(o, "    ({v:3.2}/100%)\r");
        let _ = o.flush();
    }

    /// Reports `done` of `total` (printed at each 1% step).
    pub fn update(&mut self, done: u64, total: u64) {
        let v = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        if v - self.last >= 1.0 || (v >= 100.0 && self.last < 100.0) {
            self.last = v;
            self.print(v);
        }
    }

    /// Reports a fraction (0.0 to 1.0) done.
    pub fn fraction(&mut self, f: f64) {
        self.update((f.clamp(0.0, 1.0) * 1e6) as u64, 1_000_000);
    }

    /// Prints 100% and the final newline.
    pub fn finish(self) {
        self.print(100.0);
        let _ = writeln!(std::io::stdout());
    }
}
