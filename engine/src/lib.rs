//! # quring: a qcow2 storage engine on io_uring
//!
//! quring reads and writes qcow2 images (v2 and v3, as QEMU defines them) with every I/O
//! — guest data and metadata — going through io_uring with O_DIRECT. It is built for VMMs
//! that want a qcow2 fast path: one [`Image`](image::Image) shared by all threads, one
//! [`Queue`](queue::Queue) per I/O thread (iothread or virtqueue), no async runtime, and a
//! file descriptor to wait on from your own event loop.
//!
//! ## Using it from a VMM
//!
//! ```no_run
//! use quring::image::{CacheMode, Image, Options};
//! use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
//! use std::time::Duration;
//!
//! // Once, at start-up: open the image (and its backing chain) with the options you need.
//! let img = Image::open(
//!     std::path::Path::new("disk.qcow2"),
//!     &Options { cache: CacheMode::Writeback, ..Options::default() },
//! )?;
//!
//! // In each I/O thread: one queue, owned by that thread.
//! let mut q = Queue::new(&img, &QueueOptions::default())?;
//! let mut buf = vec![0u8; 4096];
//! // Guest memory goes in as pointers (or `Op::Readv`/`Op::Writev` iovecs): no copy for
//! // 512-byte aligned buffers. The buffer must stay valid until the completion returns.
//! unsafe { q.submit(Request { op: Op::Read { offset: 0, buf: buf.as_mut_ptr(), len: 4096 }, user_data: 1 })? };
//! q.commit()?; // one io_uring_enter for everything submitted
//!
//! // In the event loop: wait on `q.ring_fd()` (POLLIN) with poll/epoll, then reap without
//! // blocking. `user_data` tells you which request finished; `result` is 0 or -errno.
//! let mut done: Vec<Completion> = Vec::new();
//! q.reap(&mut done, 0, Some(Duration::ZERO))?;
//!
//! // Flush with `Op::Flush`; at shutdown drop the queues and close the image (clears the
//! // lazy-refcount dirty bit).
//! drop(q);
//! img.close()?;
//! # Ok::<(), quring::Error>(())
//! ```
//!
//! `engine/examples/` has a complete virtio-blk-style request loop.
//!
//! Internal snapshots are taken between requests, as a VMM takes them with its queues
//! paused: [`Image::create_snapshot`](image::Image::create_snapshot),
//! [`apply_snapshot`](image::Image::apply_snapshot),
//! [`delete_snapshot`](image::Image::delete_snapshot) (see [`image::snapshot`]).
//!
//! Persistent dirty bitmaps (changed-block tracking) are tracked by every queue while the
//! image is open for writing and stored at close, as QEMU does; a backup tool reads what
//! changed with [`Image::dirty_ranges`](image::Image::dirty_ranges) (see [`image::bitmaps`]).
//!
//! ## What the format costs
//!
//! Every queue counts what its requests cost ([`Queue::counters`](queue::Queue::counters)):
//! guest requests and bytes, device writes and bytes by kind (data, L2, refcount block and
//! table, L1, header), device flushes, copy-on-write bytes, clusters allocated, L2 slice
//! loads, cache hits and misses. A queue's counters are written only by its own thread;
//! [`Image::counters`](image::Image::counters) sums every queue's (also of queues already
//! dropped) and the work done outside queues.
//!
//! ## Guarantees
//!
//! * Images quring writes pass `qemu-img check`; content equals what QEMU would produce
//!   for the same requests (tested against `qemu-io`).
//! * Metadata reaches the disk in dependency order (refcounts before the tables that use
//!   them, data before the L2 entry that maps it, decrements after the reference is gone),
//!   so a crash leaves at worst leaked clusters.
//! * A queue never blocks its thread on another queue: a request that waits for metadata
//!   another queue is loading (or for the metadata lock) is parked and retried. A flush's
//!   metadata write-back and device flushes run on the flushing queue's own ring without
//!   the metadata lock; a flush that another queue's write-back in flight covers joins it.
//! * Every byte of an image file is untrusted: corrupt images give errors that name the
//!   field, never a panic.
//! * Guest data is never written onto metadata: an L1, L2 or refcount table entry that
//!   points into metadata or past the end of the file is refused before any write uses it,
//!   and the image is then marked corrupt as QEMU does ([`meta::overlap`]).
//! * A freed host cluster is reused only after every request that started before its last
//!   reference was dropped has completed, so no request in flight reads or writes another
//!   guest offset's data. A refcount that would go below zero or past its width's maximum,
//!   or a free cluster that metadata still refers to, marks the image corrupt the same way.
//!   [`Image::audit`](image::Image::audit) checks, with the queues idle, that every
//!   cluster's refcount equals its references and that cached metadata equals the disk.
//!
//! ## Layers
//!
//! Bottom up; each module uses only its own layer and the ones below (checked by
//! `tests/layers.rs`; `docs/architecture.md` draws the import graph):
//!
//! * [`error`], [`counters`]: the error type and the cost counters.
//! * [`format`]: pure on-disk codecs (header, feature bits, extensions, L1/L2 entries,
//!   refcount packing, snapshot table, geometry, create layout). No I/O.
//! * [`io`]: aligned buffers, O_DIRECT files, the synchronous ring, QEMU-compatible image
//!   locks, test hooks.
//! * [`check`]: `qemu-img check`'s verdicts over an image file's metadata, and its repairs
//!   ([`check::repair`], `check -r leaks|all`).
//! * [`meta`]: what needs no [`Image`](image::Image): the lock-free L2 slice cache,
//!   refcount bookkeeping, the record of metadata clusters, the refcount rebuild.
//! * [`image`]: the shared [`Image`](image::Image) and every `impl Image`: open, create,
//!   close, mapping, allocation, write-back, overlap checks, block status, internal
//!   snapshots, audit.
//! * [`queue`]: the per-thread [`Queue`](queue::Queue): ring driver, request lifecycle and
//!   one state machine per I/O kind.
//!
//! Front ends sit on top in their own packages: the `quring` CLI and `quring serve`
//! (`cli/`), the fio plugin (`fio-plugin/`), the benches (`bench/`).

#![warn(missing_docs)]

pub mod check;
pub mod counters;
pub mod error;
pub mod format;
pub mod image;
pub mod io;
pub mod meta;
pub mod queue;

pub use error::{Error, Result};
