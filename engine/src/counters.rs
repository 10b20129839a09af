//! Counters kept per queue and summed per image (read by the CLI, the fio plugin and the
//! benches): what each guest request cost on the device.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        /// Live atomic counters.
        #[derive(Default, Debug)]
        pub struct Counters { $($(#[$m])* pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`Counters`].
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
        pub struct CounterSnapshot { $($(#[$m])* pub $name: u64,)* }

        impl Counters {
            /// Copies every counter.
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl Counters {
            /// Adds every counter of `s`.
            pub fn absorb(&self, s: &CounterSnapshot) {
                $(self.$name.fetch_add(s.$name, Ordering::Relaxed);)*
            }
        }

        impl CounterSnapshot {
            /// Adds every counter of `o` to this one.
            pub fn accumulate(&mut self, o: &CounterSnapshot) {
                $(self.$name += o.$name;)*
            }

            /// (name, value) pairs in a stable order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters!(
    /// Guest read requests completed.
    guest_reads,
    /// Guest write requests completed (including zero writes).
    guest_writes,
    /// Guest flush requests completed.
    guest_flushes,
    /// Guest discard requests completed.
    guest_discards,
    /// Guest bytes read.
    read_bytes,
    /// Guest bytes written.
    write_bytes,
    /// Data writes issued to the device.
    data_writes,
    /// L2 slice writes issued.
    l2_writes,
    /// Refcount block writes issued.
    refblock_writes,
    /// Refcount table writes issued.
    reftable_writes,
    /// L1 table writes issued.
    l1_writes,
    /// Header writes issued.
    header_writes,
    /// Bytes of data written to the device (guest data plus copy-on-write fills).
    data_write_bytes,
    /// Bytes of L2 tables/slices written.
    l2_write_bytes,
    /// Bytes of refcount blocks and tables written.
    refcount_write_bytes,
    /// Bytes of L1 table and header written.
    l1_header_write_bytes,
    /// Flushes (fdatasync) issued to the device.
    device_flushes,
    /// Metadata write-backs started on this queue's ring for flushes, writethrough writes
    /// or a full cache set (each ends with at least one device flush).
    writebacks,
    /// Flushes and writethrough writes that joined another queue's write-back in flight
    /// instead of starting their own (group commit across queues). Device flushes per
    /// guest flush: `device_flushes / guest_flushes` summed over the image.
    flush_joins,
    /// Bytes copied for copy-on-write (backing file or shared cluster fill).
    cow_bytes,
    /// Bytes of zeros written around guest data where the format requires them but no
    /// copy is needed (the rest of a subcluster, or of a preallocated zero cluster, that
    /// reads as zeros and is written in place). Also counted in `data_write_bytes`.
    zero_fill_bytes,
    /// Clusters allocated.
    clusters_allocated,
    /// Metadata slices loaded from the device.
    meta_loads,
    /// L2 cache hits.
    l2_hits,
    /// L2 cache misses.
    l2_misses,
    /// L2 cache evictions.
    l2_evictions,
    /// L2 slices a read loaded for itself because the cache could not take them then
    /// (see `queue/read.rs`); also counted in `meta_loads`.
    l2_private_loads,
);

impl Counters {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` to a counter that only the calling thread writes (a queue's own): a plain
    /// load and store, no locked instruction. Readers on other threads see a recent value.
    #[inline]
    pub fn bump(c: &AtomicU64, n: u64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

impl fmt::Display for CounterSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in self.fields() {
            writeln!(f, "{k:>20}: {v}")?;
        }
        Ok(())
    }
}
