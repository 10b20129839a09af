//! `quring serve --vhost-user-blk SOCKET --control PATH IMG`: a Unix socket that takes
//! one-line commands while the device is served, one connection at a time, one reply line
//! per command:
//!
//! * `resize [--shrink] SIZE` (SIZE as `quring resize` takes it: bytes with an optional
//!   k/M/G/T suffix, or `+SIZE`/`-SIZE` relative to the current size): the library's live
//!   resize ([`quring::queue::Queue::resize`]) on this thread's own queue while the
//!   virtqueue threads keep serving, then the front-end is told the configuration changed
//!   so that the guest sees the new capacity. Reply `OK NEW_SIZE`, or `OK NEW_SIZE; the
//!   front-end was not told: REASON` when it could not be told (no front-end yet: it reads
//!   the capacity when it connects), or `ERROR MESSAGE` (nothing changed).
//! * `size`: reply `OK SIZE`.
//!
//! For example `echo 'resize +1G' | socat - UNIX-CONNECT:/run/disk.ctl`.

use quring::image::Image;
use quring::queue::{Queue, QueueOptions, ResizeOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest command line accepted.
const MAX_LINE: u64 = 4096;
/// How long a connected client may stay silent before it is dropped (the socket serves one
/// client at a time).
const IDLE: Duration = Duration::from_secs(60);

/// The control socket's state shared with the server.
pub struct Control {
    pub image: Arc<Image>,
    /// Held during a resize; `true` once the server closes the image (commands then fail).
    pub closed: Arc<Mutex<bool>>,
    /// Tells the front-end the configuration changed.
    pub notify: Box<dyn Fn() -> Result<(), String> + Send>,
}

/// Binds `path` (an existing socket file is replaced, anything else is refused).
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| format!("--control {}: removing the old socket: {e}", path.display()))?,
        Ok(_) => return Err(format!("--control {}: exists and is not a socket; not replacing it", path.display())),
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|e| format!("--control {}: {e}", path.display()))
}

/// Serves the control socket on a thread of its own until the process exits.
pub fn spawn(listener: UnixListener, path: PathBuf, c: Control) -> std::io::Result<()> {
    std::thread::Builder::new().name("quring-control".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(s) => {
                    if let Err(e) = c.serve(s) {
                        eprintln!("quring serve: --control {}: {e}", path.display());
                    }
                }
                Err(e) => {
                    eprintln!("quring serve: --control {}: accept: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })?;
    Ok(())
}

impl Control {
    fn serve(&self, s: UnixStream) -> std::io::Result<()> {
        s.set_read_timeout(Some(IDLE))?;
        let mut out = s.try_clone()?;
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            if (&mut r).take(MAX_LINE).read_line(&mut line)? == 0 {
                return Ok(());
            }
            if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
                writeln!(out, "ERROR command longer than {MAX_LINE} bytes")?;
                return Ok(());
            }
            let reply = self.command(line.trim());
            writeln!(out, "{reply}")?;
        }
    }

    /// Runs one command and returns its reply line.
    fn command(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => "ERROR empty command".into(),
            ["size"] => format!("OK {}", self.image.size()),
            ["resize", rest @ ..] => {
                let (shrink, size) = match rest {
                    ["--shrink", s] => (true, *s),
                    [s] => (false, *s),
                    _ => return "ERROR usage: resize [--shrink] SIZE".into(),
                };
                match self.resize(size, shrink) {
                    Ok((new, None)) => format!("OK {new}"),
                    Ok((new, Some(why))) => format!("OK {new}; the front-end was not told: {why}"),
                    Err(e) => format!("ERROR {e}"),
                }
            }
            [w, ..] => format!("ERROR unknown command '{w}' (commands: resize [--shrink] SIZE, size)"),
        }
    }

    /// Resizes the image and tells the front-end: the new size and why the front-end
    /// could not be told, if it could not.
    fn resize(&self, size: &str, shrink: bool) -> Result<(u64, Option<String>), String> {
        let closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if *closed {
            return Err("the server is closing the image".into());
        }
        let cur = self.image.size();
        let (rel, num) = match size.as_bytes().first() {
            Some(b'+') => (1i8, &size[1..]),
            Some(b'-') => (-1i8, &size[1..]),
            _ => (0i8, size),
        };
        let n = crate::util::parse_size(num)?;
        let new = match rel {
            0 => Some(n),
            1 => cur.checked_add(n),
            _ => cur.checked_sub(n),
        }
        .filter(|&v| v > 0 && v <= i64::MAX as u64)
        .ok_or("New image size must be positive")?;
        let mut q = Queue::new(&self.image, &QueueOptions::default()).map_err(|e| e.to_string())?;
        q.resize(new, &ResizeOptions { shrink, ..Default::default() }).map_err(|e| match e {
            quring::Error::InvalidRequest(s) | quring::Error::Unsupported(s) => s,
            e => e.to_string(),
        })?;
        drop(q);
        drop(closed);
        eprintln!("quring serve: resized from {cur} to {new} bytes");
        Ok((new, (self.notify)().err()))
    }
}
