//! `quring convert`: read an image through the engine and write it as raw (sparse: all-zero
//! chunks are skipped) or qcow2.

use crate::util::open_ro;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Arguments of `quring convert`.
#[derive(Parser)]
pub struct Args {
    /// Source format (only qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output options (qcow2 output).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Force share.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image.
    src: PathBuf,
    /// Destination file.
    dst: PathBuf,
}

/// Chunk size for reads.
const CHUNK: usize = 2 << 20;
/// Chunks in flight.
const DEPTH: usize = 8;

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    if let Some(f) = &a.format
        && f != "qcow2"
    {
        return Err(format!("unsupported source format '{f}'").into());
    }
    let img = open_ro(&a.src, a.force_share).map_err(|e| format!("Could not open '{}': {e}", a.src.display()))?;
    let size = img.size();
    // The output is checked (QEMU's write lock, and no file of the input's chain) before a
    // byte of it changes; qemu-img's message names it and the output format.
    let chain = crate::output::chain_files(&img);
    let refuse = |e: String| format!("{}: error while converting {}: {e}", a.dst.display(), a.out_format);
    let mut sink = match a.out_format.as_str() {
        "raw" => {
            if !a.options.is_empty() {
                return Err("-o is only supported with -O qcow2".into());
            }
            let (f, lock) = crate::output::open_output(&a.dst, &chain, a.force_share).map_err(refuse)?;
            f.set_len(0).map_err(|e| refuse(format!("Could not truncate: {e}")))?;
            Sink::Raw(f, lock)
        }
        "qcow2" => {
            let mut o = quring::format::layout::CreateOptions::default();
            crate::util::apply_create_opts(&mut o, &a.options)?;
            if o.backing_file.is_some() {
                return Err("convert does not take a backing file for the output".into());
            }
            o.size = size;
            crate::output::check_replace(&a.dst, &chain, a.force_share).map_err(refuse)?;
            // create takes the write lock before it truncates.
            quring::image::create(&a.dst, &o, true).map_err(|e| refuse(e.to_string()))?;
            let opts = quring::image::Options { hook: quring::io::hook::from_env(), ..Default::default() };
            let out = quring::image::Image::open(&a.dst, &opts)?;
            let q = Queue::new(&out, &QueueOptions::default())?;
            Sink::Qcow2(out, Box::new(q))
        }
        o => return Err(format!("Unknown output format '{o}' (use raw or qcow2)").into()),
    };
    let pb = if a.progress || std::io::stderr().is_terminal() {
        let pb = ProgressBar::new(size);
        pb.set_style(
            ProgressStyle::with_template("    ({percent:>3}.00/100%) {bar:40} {bytes}/{total_bytes}").unwrap(),
        );
        Some(pb)
    } else {
        None
    };
    let mut q = Queue::new(&img, &QueueOptions::default())?;
    let mut bufs: Vec<quring::io::AlignedBuf> = (0..DEPTH).map(|_| quring::io::AlignedBuf::new(CHUNK)).collect();
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut offsets = [0u64; DEPTH];
    let mut next = 0u64;
    let mut inflight = 0usize;
    let mut done: Vec<Completion> = Vec::new();
    while next < size || inflight > 0 {
        while next < size && !free.is_empty() {
            let slot = free.pop().unwrap();
            let len = ((size - next).min(CHUNK as u64)) as usize;
            bufs[slot].set_len(len);
            offsets[slot] = next;
            let buf = bufs[slot].as_mut_ptr();
            // SAFETY: bufs[slot] stays allocated and untouched until its completion.
            unsafe { q.submit(Request { op: Op::Read { offset: next, buf, len }, user_data: slot as u64 })? };
            next += len as u64;
            inflight += 1;
        }
        q.commit()?;
        done.clear();
        q.reap(&mut done, 1, None)?;
        for c in done.drain(..) {
            let slot = c.user_data as usize;
            if c.result != 0 {
                let e = q
                    .error_detail(c.user_data)
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| std::io::Error::from_raw_os_error(-c.result).to_string());
                return Err(format!("error while reading at offset {}: {e}", offsets[slot]).into());
            }
            let b = &bufs[slot];
            if b.iter().any(|&x| x != 0) {
                sink.write(b, offsets[slot]).map_err(|e| format!("error while writing '{}': {e}", a.dst.display()))?;
            }
            if let Some(pb) = &pb {
                pb.inc(b.len() as u64);
            }
            inflight -= 1;
            free.push(slot);
        }
    }
    sink.finish(size)?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(0)
}

/// Where converted data goes.
enum Sink {
    /// A raw file, with QEMU's write lock held on it until the end.
    Raw(std::fs::File, quring::io::lock::ImageLock),
    Qcow2(std::sync::Arc<quring::image::Image>, Box<Queue>),
}

impl Sink {
    fn write(&mut self, b: &[u8], off: u64) -> Result<(), Box<dyn std::error::Error>> {
        match self {
            Sink::Raw(f, _) => f.write_all_at(b, off)?,
            Sink::Qcow2(_, q) => q.write_at(b, off)?,
        }
        Ok(())
    }

    fn finish(self, size: u64) -> Result<(), Box<dyn std::error::Error>> {
        match self {
            Sink::Raw(f, _lock) => {
                f.set_len(size)?;
                f.sync_all()?;
            }
            Sink::Qcow2(img, mut q) => {
                q.flush()?;
                drop(q);
                img.close()?;
            }
        }
        Ok(())
    }
}
