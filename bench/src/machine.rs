//! The machine description of the report.

use crate::results::Machine;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

/// MemTotal from /proc/meminfo, as GiB text.
pub fn mem_total(meminfo: &str) -> Option<String> {
    let kb: u64 =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())?;
    Some(format!("{:.1} GiB", kb as f64 / (1024.0 * 1024.0)))
}

/// The file system type of the longest mount point containing `path` (/proc/mounts text).
pub fn fs_type(mounts: &str, path: &Path) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for l in mounts.lines() {
        let mut f = l.split_whitespace();
        let (Some(_dev), Some(mnt), Some(fstype)) = (f.next(), f.next(), f.next()) else { continue };
        let mnt = mnt.replace("\\040", " ");
        if path.starts_with(&mnt) && best.as_ref().is_none_or(|(n, _)| mnt.len() >= *n) {
            best = Some((mnt.len(), fstype.to_string()));
        }
    }
    best.map(|(_, t)| t)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn tool_version(prog: &str, arg: &str) -> String {
    match Command::new(prog).arg(arg).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string(),
        Err(e) => format!("not runnable: {e}"),
    }
}

pub fn describe(dirs: &[(String, &Path)], tools: BTreeMap<String, String>) -> Machine {
    let mounts = read("/proc/mounts");
    let test_dirs = dirs
        .iter()
        .map(|(dev, p)| {
            let canon = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            let fs = fs_type(&mounts, &canon).unwrap_or_else(|| "unknown fs".into());
            (dev.clone(), format!("{} ({fs})", p.display()))
        })
        .collect();
    Machine {
        cpu: cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown".into()),
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        memory: mem_total(&read("/proc/meminfo")).unwrap_or_else(|| "unknown".into()),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        test_dirs,
        tools,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags : x\n").as_deref(),
            Some("AMD EPYC 7B13")
        );
        assert_eq!(mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n").as_deref(), Some("23.4 GiB"));
        let mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(fs_type(mounts, Path::new("/dev/shm/x")).as_deref(), Some("tmpfs"));
        assert_eq!(fs_type(mounts, Path::new("/var/tmp/y")).as_deref(), Some("ext4"));
        assert_eq!(fs_type(mounts, Path::new("/dev/shmx")).as_deref(), Some("ext4"));
    }
}
