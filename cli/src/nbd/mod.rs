//! `quring serve --nbd`: an NBD server on the engine, with qemu-nbd's options where they
//! apply.
//!
//! * [`proto`]: the wire format (pure codecs and request validation).
//! * [`negotiate`]: the fixed newstyle handshake (options GO, INFO, LIST, EXPORT_NAME,
//!   STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`).
//! * [`conn`]: one connection's transmission loop on its own engine queue (the design and
//!   its reasons are in that module's documentation).
//! * [`status`]: block status and CACHE on a per-connection worker thread.
//! * [`sock`]: sockets, poll, eventfds.
//!
//! This module: the listeners (a Unix socket, or TCP on each address a name resolves to),
//! the accept loop with qemu-nbd's `--shared` limit and `--persistent`, one thread per
//! connection, the pid file, and the shutdown on SIGTERM/SIGINT (connections stop reading,
//! finish what they started and close; then the image is closed).
//!
//! The folder depends on the `quring` library, `clap`, `libc`, `nix`, `slab` and
//! `crossbeam-channel` only, and on [`crate::export_opts`] (`--discard`, `--detect-zeroes`,
//! shared with the vhost-user-blk backend).

mod conn;
mod negotiate;
mod proto;
mod sock;
mod status;

use crate::export_opts::ZeroPolicy;
use conn::{Config, Summary};
use negotiate::Export;
use quring::image::{CacheMode, Image, Options};
use sock::{EventFd, Listener};
use std::net::ToSocketAddrs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The NBD options of `quring serve` (qemu-nbd's names).
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "NBD options (with --nbd)")]
pub struct NbdArgs {
    /// Listen on this Unix socket (an existing socket file is replaced).
    #[arg(short = 'k', long = "socket", value_name = "PATH", requires = "nbd", conflicts_with_all = ["bind", "port"])]
    unix_socket: Option<PathBuf>,
    /// Listen on TCP at this address [default: 0.0.0.0].
    #[arg(short = 'b', long = "bind", value_name = "ADDR", requires = "nbd")]
    bind: Option<String>,
    /// TCP port [default: 10809].
    #[arg(short = 'p', long = "port", requires = "nbd")]
    port: Option<u16>,
    /// Export name (clients asking for the empty name get it too).
    #[arg(short = 'x', long = "export-name", value_name = "NAME", default_value = "", requires = "nbd")]
    export_name: String,
    /// Export description (shown by NBD_OPT_LIST and NBD_OPT_INFO).
    #[arg(short = 'D', long = "description", requires = "nbd")]
    description: Option<String>,
    /// Connections served at once (0: no limit); more wait to be accepted. With more than
    /// one, NBD_FLAG_CAN_MULTI_CONN is advertised (every connection shares the image's
    /// cache, and a flush on one covers writes completed on all).
    #[arg(short = 'e', long = "shared", value_name = "NUM", default_value_t = 1, requires = "nbd")]
    shared: u32,
    /// Keep serving after the last client disconnected.
    #[arg(short = 't', long = "persistent", requires = "nbd")]
    persistent: bool,
    /// Write the server's pid to this file once it listens (removed at exit). The server
    /// always runs in the foreground (no --fork).
    #[arg(long = "pid-file", value_name = "PATH", requires = "nbd")]
    pid_file: Option<PathBuf>,
    /// Seconds a client has to finish the handshake.
    #[arg(long = "handshake-limit", value_name = "SECONDS", default_value_t = 10, requires = "nbd")]
    handshake_limit: u64,
    /// Image format (only qcow2).
    #[arg(short = 'f', long = "format", requires = "nbd")]
    format: Option<String>,
    /// Export a dirty bitmap as qemu:dirty-bitmap:NAME. Not available yet: the engine has
    /// no persistent bitmaps; the option is refused.
    #[arg(short = 'B', long = "bitmap", value_name = "NAME", requires = "nbd")]
    bitmap: Option<String>,
    /// One line per connection (start, end, requests) on stderr.
    #[arg(short = 'v', long = "verbose", requires = "nbd")]
    verbose: bool,
}

/// How long shutdown waits for connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the NBD server for `image` until the last client leaves (without `--persistent`)
/// or SIGTERM/SIGINT. `zero`: `--discard` and `--detect-zeroes` (TRIM, WRITE_ZEROES without
/// NO_HOLE, and WRITEs of zeros).
pub fn run(
    a: &NbdArgs,
    image_path: &Path,
    read_only: bool,
    cache: CacheMode,
    zero: ZeroPolicy,
) -> Result<u8, Box<dyn std::error::Error>> {
    if let Some(b) = &a.bitmap {
        return Err(format!(
            "--bitmap {b}: dirty bitmaps are not supported yet (the engine has none), so \
             qemu:dirty-bitmap contexts cannot be exported"
        )
        .into());
    }
    if let Some(f) = &a.format
        && f != "qcow2"
    {
        return Err(format!("-f {f}: only qcow2 images are served").into());
    }
    if a.export_name.len() > proto::MAX_STRING {
        return Err("--export-name: longer than 4096 bytes".into());
    }
    // A client that goes away must cost an EPIPE, not the process.
    // SAFETY: setting a signal disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    // SIGTERM/SIGINT go to one thread; block them here before any thread exists, so that
    // every thread inherits the mask.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.thread_block()?;

    let opts = Options { read_only, cache, hook: quring::io::hook::from_env(), ..Options::default() };
    let image =
        Image::open(image_path, &opts).map_err(|e| format!("Could not open '{}': {e}", image_path.display()))?;
    let listeners = bind(a)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_fd = Arc::new(EventFd::new()?);
    {
        let (stop, stop_fd) = (stop.clone(), stop_fd.clone());
        std::thread::Builder::new().name("quring-signals".into()).spawn(move || {
            if let Ok(sig) = sigs.wait() {
                eprintln!("quring serve: {}: finishing requests in flight, then closing", sig.as_str());
            }
            stop.store(true, Ordering::Release);
            stop_fd.signal();
        })?;
    }
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("--pid-file {}: {e}", p.display()))?;
    }

    let g = image.geometry();
    let cfg = Arc::new(Config {
        export: Export {
            name: a.export_name.clone(),
            description: a.description.clone(),
            size: image.size(),
            read_only: image.read_only(),
            multi_conn: a.shared != 1,
            fast_zero: image.header().version >= 3,
        },
        image: image.clone(),
        zero,
        handshake_limit: Duration::from_secs(a.handshake_limit.max(1)),
        stop: stop.clone(),
        stop_fd: stop_fd.fd(),
        verbose: a.verbose,
    });
    let where_ = match &a.unix_socket {
        Some(p) => format!("unix:{}", p.display()),
        None => listeners.iter().map(|(_, d)| d.as_str()).collect::<Vec<_>>().join(", "),
    };
    eprintln!(
        "quring serve: {} ({} bytes, {} KiB clusters{}) exported as '{}' over NBD on {where_}{}",
        image_path.display(),
        image.size(),
        g.cluster_size() >> 10,
        if image.read_only() { ", read-only" } else { "" },
        a.export_name,
        match a.shared {
            0 => ", unlimited connections".to_string(),
            1 => String::new(),
            n => format!(", up to {n} connections"),
        }
    );

    let total = Arc::new(Mutex::new(Summary::default()));
    let done_fd = Arc::new(EventFd::new()?);
    let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut accepted = 0u64;
    let mut failure: Option<String> = None;
    'serve: loop {
        let n_active = active.load(Ordering::Acquire);
        if !a.persistent && accepted > 0 && n_active == 0 {
            break;
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        let accepting = a.shared == 0 || n_active < a.shared as usize;
        let mut fds = vec![sock::pollfd(stop_fd.fd(), libc::POLLIN), sock::pollfd(done_fd.fd(), libc::POLLIN)];
        if accepting {
            fds.extend(listeners.iter().map(|(l, _)| sock::pollfd(l.fd(), libc::POLLIN)));
        }
        sock::poll(&mut fds, None)?;
        if fds[1].revents != 0 {
            done_fd.drain();
            threads.retain(|t| !t.is_finished());
        }
        if !accepting {
            continue;
        }
        for (i, (l, _)) in listeners.iter().enumerate() {
            if fds[2 + i].revents == 0 {
                continue;
            }
            loop {
                if a.shared != 0 && active.load(Ordering::Acquire) >= a.shared as usize {
                    break;
                }
                let s = match l.accept() {
                    Ok(Some(s)) => s,
                    Ok(None) => break,
                    // Out of descriptors or memory: keep serving the connections we have.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                        ) =>
                    {
                        eprintln!("quring serve: accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                    Err(e) => {
                        failure = Some(format!("accept: {e}"));
                        break 'serve;
                    }
                };
                accepted += 1;
                let id = accepted;
                active.fetch_add(1, Ordering::AcqRel);
                let (cfg, total, gone, done_fd) = (cfg.clone(), total.clone(), active.clone(), done_fd.clone());
                let t = std::thread::Builder::new().name(format!("quring-nbd-{id}")).spawn(move || {
                    // Frees the connection's slot however the thread ends (a panic included).
                    let _slot = Slot { active: gone, done: done_fd };
                    let peer = s.peer();
                    if cfg.verbose {
                        eprintln!("quring serve: connection {id} ({peer}) opened");
                    }
                    let r = conn::serve(s, &cfg);
                    if cfg.verbose {
                        eprintln!("quring serve: connection {id} ({peer}) closed: {}; {r}", r.end);
                    }
                    total.lock().unwrap_or_else(|e| e.into_inner()).add(&r);
                });
                match t {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        active.fetch_sub(1, Ordering::AcqRel);
                        eprintln!("quring serve: cannot start a connection thread: {e}");
                    }
                }
            }
        }
    }

    // Shutdown: connections stop reading, finish their requests and close.
    drop(listeners);
    stop.store(true, Ordering::Release);
    stop_fd.signal();
    let start = Instant::now();
    while threads.iter().any(|t| !t.is_finished()) && start.elapsed() < DRAIN_TIMEOUT {
        std::thread::sleep(Duration::from_millis(2));
    }
    let stuck = threads.iter().filter(|t| !t.is_finished()).count();
    for t in threads.into_iter().filter(|t| t.is_finished()) {
        let _ = t.join();
    }
    if let Some(p) = &a.unix_socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    let t = total.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!("quring serve: {accepted} connection(s); {t}");
    if stuck > 0 {
        // Their queues still hold the image: closing it now would race their requests.
        eprintln!(
            "quring serve: {stuck} connection(s) did not finish within {} s; exiting without closing the image",
            DRAIN_TIMEOUT.as_secs()
        );
        return Ok(1);
    }
    image.close().map_err(|e| format!("closing '{}': {e}", image_path.display()))?;
    if let Some(f) = failure {
        eprintln!("quring serve: {f}");
        return Ok(1);
    }
    Ok(0)
}

/// A connection's place in the `--shared` count, given back when its thread ends.
struct Slot {
    active: Arc<std::sync::atomic::AtomicUsize>,
    done: Arc<EventFd>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.done.signal();
    }
}

/// Binds the listeners: the Unix socket, or TCP on every address `-b` resolves to.
fn bind(a: &NbdArgs) -> Result<Vec<(Listener, String)>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    if let Some(p) = &a.unix_socket {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(p).map_err(|e| format!("removing the old socket {}: {e}", p.display()))?
            }
            Ok(_) => return Err(format!("-k {}: exists and is not a socket; not replacing it", p.display()).into()),
            Err(_) => {}
        }
        let l = std::os::unix::net::UnixListener::bind(p).map_err(|e| format!("-k {}: {e}", p.display()))?;
        l.set_nonblocking(true)?;
        out.push((Listener::Unix(l), format!("unix:{}", p.display())));
        return Ok(out);
    }
    let host = a.bind.clone().unwrap_or_else(|| "0.0.0.0".into());
    let port = a.port.unwrap_or(10809);
    let addrs: Vec<_> =
        (host.as_str(), port).to_socket_addrs().map_err(|e| format!("-b {host}: cannot resolve: {e}"))?.collect();
    for addr in addrs {
        let l = std::net::TcpListener::bind(addr).map_err(|e| format!("-b {host} -p {port}: {addr}: {e}"))?;
        l.set_nonblocking(true)?;
        let desc = format!("tcp:{}", l.local_addr().unwrap_or(addr));
        out.push((Listener::Tcp(l), desc));
    }
    if out.is_empty() {
        return Err(format!("-b {host}: no address to listen on").into());
    }
    Ok(out)
}
