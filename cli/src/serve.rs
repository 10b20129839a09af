//! `quring serve --vhost-user-blk SOCKET IMAGE`: a vhost-user-blk backend on the rust-vmm
//! crates, so that QEMU, cloud-hypervisor or any vhost-user capable VMM uses quring as its
//! qcow2 data path without code changes.
//!
//! Shape: the vhost-user-backend daemon runs one epoll thread per virtqueue
//! (`queues_per_thread` gives each thread one queue). Each of those threads owns, in a
//! thread-local, one quring [`Queue`] (io_uring rings are per thread), a table of the virtio
//! requests it has in flight and a timer. The thread's epoll set holds the virtqueue's kick
//! eventfd (new requests), the queue's ring fd (completions) and the timer (requests parked on
//! another queue's metadata work are only retried when the queue is reaped; nothing signals
//! the ring fd for them).
//!
//! A virtio request becomes one engine request per guest memory segment (the engine's
//! `Op::Readv`/`Op::Writev` would make it one request; not used here yet); when segments are
//! not multiples of 512 bytes the data goes through a bounce buffer. The request completes
//! when all its segments did.
//!
//! Discards and write-zeroes (VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES) follow
//! `--discard` and `--detect-zeroes` as the NBD server does ([`crate::export_opts`]). The
//! discard granularity advertised (`discard_sector_alignment`) is the image's: the cluster,
//! or the subcluster with extended L2 entries, where a discard of whole subclusters inside
//! a cluster makes them read as zeros through the subcluster bitmap (whole clusters are
//! freed; QEMU's qcow2 ignores discards smaller than a cluster). Such a partial discard of
//! a compressed cluster is a zero write the entry cannot express: the engine then copies
//! the cluster, as for any partial zero write there.
//!
//! A live resize comes through the control socket (`--control`, [`crate::serve_control`]);
//! the front-end is then told through the back-end request channel
//! ([`crate::backend_channel`]) and re-reads the capacity, which [`blk_config`] computes
//! from the image's current size.
//!
//! The server handles one front-end connection: when it disconnects, or on SIGTERM/SIGINT,
//! the threads drain their in-flight requests, the image is closed cleanly and a per-queue
//! summary is printed on stderr.

use crate::export_opts::{ZeroPolicy, is_zero};
use clap::{Parser, ValueEnum};
use quring::image::{CacheMode, Image, Options};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use slab::Slab;
use std::cell::RefCell;
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};
use vmm_sys_util::timerfd::TimerFd;

/// Arguments of `quring serve`.
#[derive(Parser)]
pub struct Args {
    /// Serve the image as a vhost-user-blk device on this UNIX socket (created; an existing
    /// file is replaced).
    #[arg(long = "vhost-user-blk", value_name = "SOCKET", required_unless_present = "nbd", conflicts_with = "nbd")]
    socket: Option<PathBuf>,
    /// Serve the image over NBD instead (options below; `quring serve --nbd -k SOCK IMG`).
    #[arg(long)]
    nbd: bool,
    /// Number of virtqueues offered (each served by its own thread and quring queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64), conflicts_with = "nbd")]
    queues: u16,
    /// Export the image read-only (VIRTIO_BLK_F_RO; NBD_FLAG_READ_ONLY).
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Write cache mode of the image (I/O is always O_DIRECT: qemu's `none` is writeback,
    /// `directsync` is writethrough).
    #[arg(long, value_enum, default_value_t = Cache::Writeback)]
    cache: Cache,
    #[command(flatten)]
    zero: crate::export_opts::ZeroArgs,
    /// (vhost-user-blk) A Unix socket taking commands while the device is served:
    /// `resize [--shrink] SIZE` resizes the image live and tells the front-end (the guest
    /// sees the new capacity), `size` prints the size. One reply line per command.
    #[arg(long = "control", value_name = "PATH", conflicts_with = "nbd")]
    control: Option<PathBuf>,
    #[command(flatten)]
    nbd_args: crate::nbd::NbdArgs,
    /// The qcow2 image.
    image: PathBuf,
}

/// `--cache` values.
#[derive(Clone, Copy, ValueEnum)]
enum Cache {
    #[value(alias = "none")]
    Writeback,
    #[value(alias = "directsync")]
    Writethrough,
}

/// Descriptors per virtqueue.
const QUEUE_SIZE: usize = 256;
/// Data segments per request we advertise (seg_max): the queue size minus header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest discard / write-zeroes range per segment, in sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Segments per discard / write-zeroes request advertised (max_discard_seg,
/// max_write_zeroes_seg); requests with up to [`SEG_MAX`] are taken.
const MAX_DWZ_SEG: u32 = 1;
/// Size of a discard / write-zeroes segment (struct virtio_blk_discard_write_zeroes).
const DWZ_SEG_BYTES: usize = 16;
/// Serial number returned by VIRTIO_BLK_T_GET_ID.
const SERIAL: &[u8] = b"quring";
/// How long after an event a queue with requests in flight is reaped again without a
/// completion (requests parked behind another queue's metadata I/O).
const RETRY_AFTER: Duration = Duration::from_micros(500);
/// How long stopping a virtqueue waits for its in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type Vring = VringRwLock<Mem>;

/// Per-virtqueue counters, shared with the main thread for the exit summary.
#[derive(Default)]
struct QueueStats {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Kernel thread id of the thread serving the queue (0: never used).
    tid: AtomicU64,
}

/// State shared by every clone of the backend (the daemon clones it into each thread).
struct Shared {
    image: Arc<Image>,
    num_queues: usize,
    read_only: bool,
    mem: Mem,
    /// `--discard`, `--detect-zeroes`.
    zero: ZeroPolicy,
    /// The back-end request channel, once the front-end set it up.
    channel: Mutex<Option<crate::backend_channel::Channel>>,
    /// The process's sockets before the front-end connected (to find the channel).
    sockets_before: OnceLock<HashSet<u64>>,
    /// The epoll handlers, one per thread, to add the ring fd and timer to (set once the
    /// daemon exists).
    handlers: OnceLock<Vec<Arc<VringEpollHandler<BlkBackend>>>>,
    event_idx: AtomicBool,
    stats: Vec<QueueStats>,
    /// Virtqueues with requests in flight right now, and the most seen at once.
    busy_queues: AtomicUsize,
    max_busy_queues: AtomicUsize,
    /// Set on SIGTERM/SIGINT: take no new requests, finish those in flight.
    stopping: AtomicBool,
}

#[derive(Clone)]
struct BlkBackend(Arc<Shared>);

/// The discard granularity of an image: the subcluster with extended L2 entries, else
/// the cluster.
fn discard_granularity(image: &Image) -> u64 {
    let g = image.geometry();
    if g.extended_l2 { g.subcluster_size() } else { g.cluster_size() }
}

/// Builds the virtio_blk_config structure (little endian, VIRTIO 1.x layout) from the
/// image's current size.
fn blk_config(image: &Image, num_queues: u16, zero: &ZeroPolicy) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let put = |c: &mut Vec<u8>, off: usize, v: &[u8]| c[off..off + v.len()].copy_from_slice(v);
    put(&mut c, 0, &(image.size() / 512).to_le_bytes()); // capacity
    put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
    put(&mut c, 20, &512u32.to_le_bytes()); // blk_size
    put(&mut c, 34, &num_queues.to_le_bytes()); // num_queues
    let gran_sectors = (discard_granularity(image) / 512) as u32;
    put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(&mut c, 40, &MAX_DWZ_SEG.to_le_bytes()); // max_discard_seg
    put(&mut c, 44, &gran_sectors.to_le_bytes()); // discard_sector_alignment
    put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(&mut c, 52, &MAX_DWZ_SEG.to_le_bytes()); // max_write_zeroes_seg
    c[56] = zero.discard_unmap as u8; // write_zeroes_may_unmap
    c
}

/// What a guest discard of `[offset, offset + len)` does with `--discard=unmap`: whole
/// clusters are discarded (`true`); with extended L2 entries (`sub`: the subcluster size)
/// the whole subclusters of a partly covered cluster become zero subclusters (`false`:
/// a zero write of whole subclusters, which only changes the bitmap). Pieces smaller than
/// the granularity are left alone (a discard is a hint).
fn discard_pieces(offset: u64, len: u64, cluster: u64, sub: Option<u64>) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let (c0, c1) = (offset.div_ceil(cluster) * cluster, end / cluster * cluster);
    let mut out = Vec::new();
    let zero = |a: u64, b: u64, out: &mut Vec<(u64, u64, bool)>| {
        if let Some(s) = sub {
            let (a, b) = (a.div_ceil(s) * s, b / s * s);
            if a < b {
                out.push((a, b - a, false));
            }
        }
    };
    if c0 < c1 {
        zero(offset, c0, &mut out);
        out.push((c0, c1 - c0, true));
        zero(c1, end, &mut out);
    } else {
        zero(offset, end, &mut out);
    }
    out
}

/// Whether guest ranges hold only zeros (`--detect-zeroes`), read in small pieces.
fn guest_is_zero(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)]) -> bool {
    let mut buf = [0u8; 4096];
    for &(addr, len) in segs {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(buf.len());
            if mem.read_slice(&mut buf[..n], GuestAddress(addr.0 + at as u64)).is_err() || !is_zero(&buf[..n]) {
                return false;
            }
            at += n;
        }
    }
    true
}

impl Shared {
    /// Tells the front-end the configuration (the capacity) changed.
    fn notify_config_change(&self) -> Result<(), String> {
        let ch = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ch) = ch.as_ref() else {
            return Err("no back-end request channel (no front-end yet, or it did not negotiate \
                        VHOST_USER_PROTOCOL_F_BACKEND_REQ)"
                .into());
        };
        ch.config_changed().map_err(|e| format!("VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: {e}"))
    }
}

impl BlkBackend {
    /// Epoll event id of the ring fd / timer of a thread (the daemon reserves
    /// 0..=num_queues for vrings and its own exit/enable events).
    fn ring_event(&self) -> u16 {
        self.0.num_queues as u16 + 1
    }
    fn timer_event(&self) -> u16 {
        self.0.num_queues as u16 + 2
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.0.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let mut ch = self.0.channel.lock().unwrap_or_else(|e| e.into_inner());
        // The previous channel (if the front-end sends a new one) goes first, so that its
        // socket is not mistaken for the new one.
        *ch = None;
        let empty = HashSet::new();
        let before = self.0.sockets_before.get().unwrap_or(&empty);
        match crate::backend_channel::Channel::find(before, backend) {
            Ok(c) => *ch = Some(c),
            Err(e) => eprintln!("quring serve: back-end request channel: {e}; a resize will not reach the guest"),
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = &blk_config(&self.0.image, self.0.num_queues as u16, &self.0.zero);
        let start = (offset as usize).min(c.len());
        let end = (offset as usize).saturating_add(size as usize).min(c.len());
        let mut v = c[start..end].to_vec();
        v.resize(size as usize, 0);
        v
    }

    fn update_memory(&self, _mem: Mem) -> std::io::Result<()> {
        // The daemon swaps the map inside the GuestMemoryAtomic we share with it; requests in
        // flight keep the old map alive through their own Arc.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // The front-end reads the ring position right after this: finish what was popped.
        let Some(st) = self.0.stats.get(queue_index as usize) else { return Ok(()) };
        let start = Instant::now();
        while st.in_flight.load(Ordering::Acquire) > 0 {
            if start.elapsed() > DRAIN_TIMEOUT {
                eprintln!("quring serve: queue {queue_index}: requests still in flight at stop");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        let vring = &vrings[0];
        WORKER.with(|w| {
            let mut w = w.borrow_mut();
            if w.is_none() {
                *w = Some(Worker::new(self, thread_id)?);
            }
            let w = w.as_mut().expect("just set");
            // The timer needs no read: re-arming or disarming it below resets its expiry
            // count (a blocking read here could also hang: an earlier event of the same
            // epoll batch may have re-armed it already).
            if device_event == 0 {
                w.process_available(vring)?;
            }
            w.reap(vring)?;
            w.rearm_timer();
            Ok(())
        })
    }
}

thread_local! {
    /// The serving state of the virtqueue this thread owns (created on its first event).
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// A piece of a guest buffer, as host memory.
#[derive(Clone, Copy)]
struct HostSeg {
    ptr: *mut u8,
    len: usize,
}

/// A virtio request with engine requests in flight.
struct Pending {
    head: u16,
    status_addr: GuestAddress,
    used_len: u32,
    /// Engine requests not completed yet.
    pending: u32,
    status: u8,
    /// Bounce buffer of an unaligned request, and (reads) where to scatter it at the end.
    bounce: Option<(Vec<u8>, Vec<HostSeg>)>,
    /// Keeps the guest memory map the pointers point into alive.
    _mem: Arc<GuestMemoryMmap>,
}

/// One virtqueue's serving state, owned by its epoll thread.
struct Worker {
    // Field order matters: the queue is dropped first, waiting for the kernel to be done with
    // guest buffers, before the pending table drops the memory maps they point into.
    queue: Queue,
    pending: Slab<Pending>,
    done: Vec<Completion>,
    timer: TimerFd,
    shared: Arc<Shared>,
    index: usize,
    /// Completed virtio requests not yet put on the used ring.
    used: Vec<(u16, u32)>,
}

/// The guest ranges of a descriptor chain, split by direction.
struct Chain {
    readable: Vec<(GuestAddress, usize)>,
    writable: Vec<(GuestAddress, usize)>,
}

/// Removes `n` bytes from the front of a list of guest ranges and returns them.
fn take_front(segs: &mut Vec<(GuestAddress, usize)>, mut n: usize) -> Option<Vec<(GuestAddress, usize)>> {
    let mut out = Vec::new();
    while n > 0 {
        let (addr, len) = *segs.first()?;
        if len <= n {
            out.push((addr, len));
            segs.remove(0);
            n -= len;
        } else {
            out.push((addr, n));
            segs[0] = (GuestAddress(addr.0 + n as u64), len - n);
            n = 0;
        }
    }
    Some(out)
}

/// Removes the last byte of a list of guest ranges and returns its address.
fn take_last_byte(segs: &mut Vec<(GuestAddress, usize)>) -> Option<GuestAddress> {
    while let Some(&(addr, len)) = segs.last() {
        if len == 0 {
            segs.pop();
            continue;
        }
        if len == 1 {
            segs.pop();
        } else {
            *segs.last_mut().unwrap() = (addr, len - 1);
        }
        return Some(GuestAddress(addr.0 + len as u64 - 1));
    }
    None
}

/// Copies guest ranges into a byte vector.
fn read_guest(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)]) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    for &(addr, len) in segs {
        let start = v.len();
        v.resize(start + len, 0);
        mem.read_slice(&mut v[start..], addr).ok()?;
    }
    Some(v)
}

/// Host pointers of guest ranges (a range may span several memory regions).
fn host_segs(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)]) -> Option<Vec<HostSeg>> {
    let mut out = Vec::new();
    for &(addr, len) in segs {
        for s in GuestMemoryBackend::get_slices(mem, addr, len) {
            let s = s.ok()?;
            out.push(HostSeg { ptr: s.ptr_guard_mut().as_ptr(), len: s.len() });
        }
    }
    Some(out)
}

impl Worker {
    fn new(b: &BlkBackend, index: usize) -> std::io::Result<Worker> {
        let shared = b.0.clone();
        let queue = Queue::new(&shared.image, &QueueOptions { ring_entries: QUEUE_SIZE as u32, ..Default::default() })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let timer = TimerFd::new()?;
        let handler = &shared.handlers.get().ok_or_else(|| std::io::Error::other("no epoll handler"))?[index];
        handler.register_listener(queue.ring_fd(), EventSet::IN, b.ring_event() as u64)?;
        handler.register_listener(timer.as_raw_fd(), EventSet::IN, b.timer_event() as u64)?;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        shared.stats[index].tid.store(tid as u64, Ordering::Relaxed);
        Ok(Worker { queue, pending: Slab::new(), done: Vec::new(), timer, shared, index, used: Vec::new() })
    }

    fn stats(&self) -> &QueueStats {
        &self.shared.stats[self.index]
    }

    /// Pops every available descriptor chain and starts it.
    fn process_available(&mut self, vring: &Vring) -> std::io::Result<()> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        loop {
            let mem = self.shared.mem.memory().into_inner();
            let chains: Vec<(u16, Chain)> = {
                let mut st = vring.get_mut();
                if self.shared.event_idx.load(Ordering::Acquire) {
                    st.disable_notification().map_err(std::io::Error::other)?;
                }
                let Ok(iter) = st.get_queue_mut().iter(mem.clone()) else { return Ok(()) };
                iter.map(|chain| {
                    let head = chain.head_index();
                    let mut c = Chain { readable: Vec::new(), writable: Vec::new() };
                    for d in chain {
                        let r = (d.addr(), d.len() as usize);
                        if d.is_write_only() { c.writable.push(r) } else { c.readable.push(r) }
                    }
                    (head, c)
                })
                .collect()
            };
            for (head, chain) in chains {
                self.start(head, chain, &mem);
            }
            self.queue.commit().map_err(|e| std::io::Error::other(e.to_string()))?;
            if !self.shared.event_idx.load(Ordering::Acquire) || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        self.publish_used(vring)
    }

    /// Starts one virtio-blk request.
    fn start(&mut self, head: u16, mut c: Chain, mem: &Arc<GuestMemoryMmap>) {
        self.stats().requests.fetch_add(1, Ordering::Relaxed);
        let Some(status_addr) = take_last_byte(&mut c.writable) else {
            // No status byte: nothing can be reported; give the descriptors back.
            self.used.push((head, 0));
            return;
        };
        let Some(hdr) = take_front(&mut c.readable, 16).and_then(|h| read_guest(mem, &h)) else {
            return self.finish_now(mem, head, status_addr, 1, VIRTIO_BLK_S_IOERR as u8);
        };
        let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let mut p = Pending {
            head,
            status_addr,
            used_len: 1,
            pending: 0,
            status: VIRTIO_BLK_S_OK as u8,
            bounce: None,
            _mem: mem.clone(),
        };
        let mut ops: Vec<Op> = Vec::new();
        match ty {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = ty == VIRTIO_BLK_T_OUT;
                let data = if write { &c.readable } else { &c.writable };
                let Some(segs) = host_segs(mem, data) else {
                    return self.finish_now(mem, head, status_addr, 1, VIRTIO_BLK_S_IOERR as u8);
                };
                let total: usize = segs.iter().map(|s| s.len).sum();
                let Some(mut offset) = sector.checked_mul(512) else {
                    return self.finish_now(mem, head, status_addr, 1, VIRTIO_BLK_S_IOERR as u8);
                };
                if write {
                    self.stats().writes.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats().reads.fetch_add(1, Ordering::Relaxed);
                    p.used_len += total as u32;
                }
                let zero_write = if write {
                    self.shared
                        .zero
                        .detected_zero(|| total > 0 && total.is_multiple_of(512) && guest_is_zero(mem, data))
                } else {
                    None
                };
                if let Some(unmap) = zero_write {
                    ops.push(Op::WriteZeroes { offset, len: total as u64, unmap });
                } else if segs.iter().all(|s| s.len % 512 == 0) {
                    for s in segs.iter().filter(|s| s.len > 0) {
                        ops.push(if write {
                            Op::Write { offset, buf: s.ptr, len: s.len }
                        } else {
                            Op::Read { offset, buf: s.ptr, len: s.len }
                        });
                        offset += s.len as u64;
                    }
                } else {
                    // Segments the engine cannot take one by one: one request through a
                    // bounce buffer (the engine rejects a total that is not sector-sized).
                    let mut buf = vec![0u8; total];
                    if write {
                        let mut at = 0;
                        for s in &segs {
                            // SAFETY: s.ptr..+len is guest memory kept mapped by `mem`; buf
                            // has `total` bytes, the sum of the segment lengths.
                            unsafe { std::ptr::copy_nonoverlapping(s.ptr, buf.as_mut_ptr().add(at), s.len) };
                            at += s.len;
                        }
                        ops.push(Op::Write { offset, buf: buf.as_ptr(), len: total });
                        p.bounce = Some((buf, Vec::new()));
                    } else {
                        ops.push(Op::Read { offset, buf: buf.as_mut_ptr(), len: total });
                        p.bounce = Some((buf, segs));
                    }
                }
                if total == 0 {
                    p.status = VIRTIO_BLK_S_IOERR as u8;
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats().flushes.fetch_add(1, Ordering::Relaxed);
                ops.push(Op::Flush);
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..SERIAL.len()].copy_from_slice(SERIAL);
                let mut at = 0;
                for &(addr, len) in &c.writable {
                    let n = len.min(id.len() - at);
                    if mem.write_slice(&id[at..at + n], addr).is_err() {
                        p.status = VIRTIO_BLK_S_IOERR as u8;
                    }
                    at += n;
                }
                p.used_len += at as u32;
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let zero = ty == VIRTIO_BLK_T_WRITE_ZEROES;
                let stat = if zero { &self.stats().write_zeroes } else { &self.stats().discards };
                stat.fetch_add(1, Ordering::Relaxed);
                // The body is guest-sized: bounded before it is read.
                let body_len = c.readable.iter().fold(0usize, |a, r| a.saturating_add(r.1));
                if body_len == 0
                    || !body_len.is_multiple_of(DWZ_SEG_BYTES)
                    || body_len > SEG_MAX as usize * DWZ_SEG_BYTES
                {
                    return self.finish_now(mem, head, status_addr, 1, VIRTIO_BLK_S_IOERR as u8);
                }
                let Some(body) = read_guest(mem, &c.readable) else {
                    return self.finish_now(mem, head, status_addr, 1, VIRTIO_BLK_S_IOERR as u8);
                };
                let size = self.shared.image.size();
                let g = self.shared.image.geometry();
                let sub = g.extended_l2.then(|| g.subcluster_size());
                for seg in body.chunks(DWZ_SEG_BYTES) {
                    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                    let num = u32::from_le_bytes(seg[8..12].try_into().unwrap()) as u64;
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                    // Unknown flags, and UNMAP on a discard: the spec's UNSUPP.
                    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (!zero && unmap) {
                        p.status = VIRTIO_BLK_S_UNSUPP as u8;
                        break;
                    }
                    let range = sector.checked_mul(512).zip(num.checked_mul(512));
                    let Some((offset, len)) = range.filter(|&(o, l)| o.checked_add(l).is_some_and(|e| e <= size))
                    else {
                        p.status = VIRTIO_BLK_S_IOERR as u8;
                        break;
                    };
                    if len == 0 {
                        continue;
                    }
                    if zero {
                        ops.push(Op::WriteZeroes { offset, len, unmap: self.shared.zero.zero_unmap(unmap) });
                    } else if self.shared.zero.discards() {
                        for (o, l, whole) in discard_pieces(offset, len, g.cluster_size(), sub) {
                            ops.push(if whole {
                                Op::Discard { offset: o, len: l }
                            } else {
                                Op::WriteZeroes { offset: o, len: l, unmap: false }
                            });
                        }
                    }
                }
            }
            _ => p.status = VIRTIO_BLK_S_UNSUPP as u8,
        }
        if p.status != VIRTIO_BLK_S_OK as u8 {
            ops.clear();
        }
        let key = self.pending.insert(p);
        if self.stats().in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            let busy = self.shared.busy_queues.fetch_add(1, Ordering::AcqRel) + 1;
            self.shared.max_busy_queues.fetch_max(busy, Ordering::AcqRel);
        }
        self.stats().max_in_flight.fetch_max(self.pending.len(), Ordering::Relaxed);
        for op in ops {
            // SAFETY: the buffers are guest memory kept mapped by the Arc in `Pending`, or the
            // bounce buffer owned by `Pending`; the entry stays in the slab (and the queue is
            // dropped before the slab) until every engine request of it completed.
            match unsafe { self.queue.submit(Request { op, user_data: key as u64 }) } {
                Ok(()) => self.pending[key].pending += 1,
                Err(_) => {
                    self.pending[key].status = VIRTIO_BLK_S_IOERR as u8;
                    break;
                }
            }
        }
        if self.pending[key].pending == 0 {
            self.complete(key);
        }
    }

    /// Reports a request that started nothing.
    fn finish_now(&mut self, mem: &GuestMemoryMmap, head: u16, status_addr: GuestAddress, used: u32, status: u8) {
        let _ = mem.write_obj(status, status_addr);
        self.stats().errors.fetch_add(1, Ordering::Relaxed);
        self.used.push((head, used));
    }

    /// Finishes a virtio request whose engine requests all completed.
    fn complete(&mut self, key: usize) {
        let p = self.pending.remove(key);
        let mut status = p.status;
        if status == VIRTIO_BLK_S_OK as u8
            && let Some((buf, segs)) = &p.bounce
        {
            let mut at = 0;
            for s in segs {
                // SAFETY: s.ptr..+len is guest memory kept mapped by p._mem; buf holds the sum
                // of the segment lengths.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(at), s.ptr, s.len) };
                at += s.len;
            }
        }
        if p._mem.write_obj(status, p.status_addr).is_err() {
            status = VIRTIO_BLK_S_IOERR as u8;
        }
        if status != VIRTIO_BLK_S_OK as u8 {
            self.stats().errors.fetch_add(1, Ordering::Relaxed);
        }
        self.used.push((p.head, p.used_len));
        if self.stats().in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.busy_queues.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Takes the engine's completions and finishes the virtio requests they end.
    fn reap(&mut self, vring: &Vring) -> std::io::Result<()> {
        if self.queue.in_flight() == 0 {
            return Ok(());
        }
        self.done.clear();
        self.queue.reap(&mut self.done, 0, Some(Duration::ZERO)).map_err(|e| std::io::Error::other(e.to_string()))?;
        let done = std::mem::take(&mut self.done);
        for c in &done {
            let key = c.user_data as usize;
            let Some(p) = self.pending.get_mut(key) else { continue };
            if c.result != 0 {
                p.status = VIRTIO_BLK_S_IOERR as u8;
            }
            p.pending -= 1;
            if p.pending == 0 {
                self.complete(key);
            }
        }
        self.done = done;
        self.publish_used(vring)
    }

    /// Puts finished requests on the used ring and notifies the guest when it asked.
    fn publish_used(&mut self, vring: &Vring) -> std::io::Result<()> {
        if self.used.is_empty() {
            return Ok(());
        }
        for (head, len) in self.used.drain(..) {
            vring.add_used(head, len).map_err(std::io::Error::other)?;
        }
        if vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Arms the retry timer while requests are in flight (see [`RETRY_AFTER`]).
    fn rearm_timer(&mut self) {
        if self.queue.in_flight() > 0 {
            let _ = self.timer.reset(RETRY_AFTER, None);
        } else {
            let _ = self.timer.clear();
        }
    }
}

impl Drop for Worker {
    /// The thread is going away (front-end gone or shutdown): let the engine finish what it
    /// started, so that no write is left half done in the image.
    fn drop(&mut self) {
        let start = Instant::now();
        let mut done = Vec::new();
        while self.queue.in_flight() > 0 && start.elapsed() < DRAIN_TIMEOUT {
            if self.queue.reap(&mut done, 1, Some(Duration::from_millis(10))).is_err() {
                break;
            }
        }
    }
}

/// Runs `quring serve`.
pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let cache = match a.cache {
        Cache::Writeback => CacheMode::Writeback,
        Cache::Writethrough => CacheMode::Writethrough,
    };
    let zero = a.zero.policy()?;
    if a.nbd {
        return crate::nbd::run(&a.nbd_args, &a.image, a.read_only, cache, zero);
    }
    let socket = a.socket.ok_or("--vhost-user-blk or --nbd is required")?;
    let opts = Options { read_only: a.read_only, cache, hook: quring::io::hook::from_env(), ..Default::default() };
    let image = Image::open(&a.image, &opts)?;
    let num_queues = a.queues as usize;

    // SIGTERM/SIGINT go to one thread that asks the daemon to stop; block them everywhere
    // else (threads created from here on inherit the mask).
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.thread_block()?;

    let shared = Arc::new(Shared {
        image: image.clone(),
        num_queues,
        read_only: a.read_only,
        mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        zero,
        channel: Mutex::new(None),
        sockets_before: OnceLock::new(),
        handlers: OnceLock::new(),
        event_idx: AtomicBool::new(false),
        stats: (0..num_queues).map(|_| QueueStats::default()).collect(),
        busy_queues: AtomicUsize::new(0),
        max_busy_queues: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
    });
    let backend = BlkBackend(shared.clone());
    let mut daemon = VhostUserDaemon::new("quring-vhost-user-blk".into(), backend, shared.mem.clone())
        .map_err(|e| format!("vhost-user daemon: {e}"))?;
    let _ = shared.handlers.set(daemon.get_epoll_handlers());

    // The signal thread: before a front-end connected, close the image and exit; after,
    // shut the connection down so that the daemon returns.
    let conn: Arc<Mutex<(bool, Option<vhost_user_backend::ShutdownHandle>)>> = Arc::new(Mutex::new((false, None)));
    // Held while a resize runs (--control); set once the image is closed.
    let closed = Arc::new(Mutex::new(false));
    {
        let conn = conn.clone();
        let closed = closed.clone();
        let control = a.control.clone();
        let image = image.clone();
        let shared_sig = shared.clone();
        std::thread::Builder::new().name("quring-signals".into()).spawn(move || {
            let sig = sigs.wait().map(|s| s.as_str()).unwrap_or("signal");
            // Let the virtqueue threads finish what they started before the connection goes.
            shared_sig.stopping.store(true, Ordering::Release);
            let start = Instant::now();
            while shared_sig.stats.iter().any(|s| s.in_flight.load(Ordering::Acquire) > 0)
                && start.elapsed() < DRAIN_TIMEOUT
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            c.0 = true;
            match &c.1 {
                Some(h) => {
                    eprintln!("quring serve: {sig}: disconnecting");
                    h.shutdown()
                }
                None => {
                    eprintln!("quring serve: {sig} before a connection: closing");
                    *closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    let code = match image.close() {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("quring serve: close: {e}");
                            1
                        }
                    };
                    if let Some(p) = control {
                        let _ = std::fs::remove_file(p);
                    }
                    std::process::exit(code);
                }
            }
        })?;
    }

    let mut listener = Listener::new(&socket, true).map_err(|e| format!("{}: {e}", socket.display()))?;
    if let Some(path) = &a.control {
        let l = crate::serve_control::bind(path)?;
        let notify_to = shared.clone();
        let c = crate::serve_control::Control {
            image: image.clone(),
            closed: closed.clone(),
            notify: Box::new(move || notify_to.notify_config_change()),
        };
        crate::serve_control::spawn(l, path.clone(), c)?;
    }
    eprintln!(
        "quring serve: {} ({} bytes, {} queue(s)) on {}{}",
        a.image.display(),
        image.size(),
        num_queues,
        socket.display(),
        a.control.as_ref().map(|p| format!(", control socket {}", p.display())).unwrap_or_default()
    );
    // Every socket from here on that has no name is the back-end request channel.
    let _ = shared.sockets_before.set(crate::backend_channel::socket_inodes());
    daemon.start(&mut listener).map_err(|e| format!("vhost-user: {e}"))?;
    {
        let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
        c.1 = daemon.shutdown_handle();
        if c.0
            && let Some(h) = &c.1
        {
            h.shutdown();
        }
    }
    let started = Instant::now();
    let result = daemon.wait();
    // Dropping the daemon stops and joins the virtqueue threads; their thread-locals (queues)
    // are gone when this returns. The handlers kept in `shared` only hold epoll fds.
    drop(daemon);
    drop(listener);

    let mut lines = Vec::new();
    for (i, st) in shared.stats.iter().enumerate() {
        lines.push(format!(
            "quring serve: queue {i}: tid {} requests {} reads {} writes {} flushes {} discards {} \
             write_zeroes {} errors {} max_in_flight {}",
            st.tid.load(Ordering::Relaxed),
            st.requests.load(Ordering::Relaxed),
            st.reads.load(Ordering::Relaxed),
            st.writes.load(Ordering::Relaxed),
            st.flushes.load(Ordering::Relaxed),
            st.discards.load(Ordering::Relaxed),
            st.write_zeroes.load(Ordering::Relaxed),
            st.errors.load(Ordering::Relaxed),
            st.max_in_flight.load(Ordering::Relaxed),
        ));
    }
    lines.push(format!(
        "quring serve: max busy queues at once {} (connection {:.1}s)",
        shared.max_busy_queues.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    ));
    for l in &lines {
        eprintln!("{l}");
    }
    // No resize may run during or after the close.
    let mut closed = closed.lock().unwrap_or_else(|e| e.into_inner());
    *closed = true;
    *shared.channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let r = image.close();
    if let Some(p) = &a.control {
        let _ = std::fs::remove_file(p);
    }
    r?;
    eprintln!("quring serve: image closed");
    use vhost::vhost_user::Error as VuError;
    use vhost_user_backend::Error as DaemonError;
    match result {
        // The front-end went away: the normal end of a VM.
        Ok(()) | Err(DaemonError::HandleRequest(VuError::Disconnected | VuError::PartialMessage)) => Ok(0),
        Err(e) => {
            eprintln!("quring serve: connection ended with: {e}");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    #[test]
    fn discard_pieces_by_granularity() {
        // Standard clusters: only the whole clusters inside.
        assert_eq!(discard_pieces(4 * K, 200 * K, 64 * K, None), vec![(64 * K, 128 * K, true)]);
        assert_eq!(discard_pieces(4 * K, 32 * K, 64 * K, None), vec![]);
        assert_eq!(discard_pieces(0, 64 * K, 64 * K, None), vec![(0, 64 * K, true)]);
        // Extended L2 (2 KiB subclusters): whole subclusters around the whole clusters.
        assert_eq!(
            discard_pieces(4 * K + 512, 200 * K, 64 * K, Some(2 * K)),
            vec![(6 * K, 58 * K, false), (64 * K, 128 * K, true), (192 * K, 12 * K, false)]
        );
        assert_eq!(discard_pieces(3 * K, 4 * K, 64 * K, Some(2 * K)), vec![(4 * K, 2 * K, false)]);
        assert_eq!(discard_pieces(3 * K, K, 64 * K, Some(2 * K)), vec![]);
    }
}
