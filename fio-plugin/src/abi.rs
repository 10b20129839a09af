//! `#[repr(C)]` mirrors of the parts of fio 3.33's C ABI that the external engine uses.
//!
//! Only facts (offsets, sizes, constant values) are mirrored; fields the engine never
//! touches are opaque padding. Every documented offset is pinned by a unit test below,
//! so a mismatch with the fio binary shows up in `cargo test`, not as memory corruption.
//! Target: x86_64 Linux, fio 3.30..=3.33 (`FIO_IOOPS_VERSION` 31).

use std::ffi::{c_char, c_int, c_uint, c_void};

/// fio's `struct thread_data` is opaque to the engine: it is only passed around by pointer.
#[repr(C)]
pub struct ThreadData {
    _opaque: [u8; 0],
}

/// `FIO_IOOPS_VERSION` of fio 3.30..=3.33.
pub const FIO_IOOPS_VERSION: c_int = 31;

// enum fio_ddir
pub const DDIR_READ: c_int = 0;
pub const DDIR_WRITE: c_int = 1;
pub const DDIR_TRIM: c_int = 2;
pub const DDIR_SYNC: c_int = 3;
pub const DDIR_DATASYNC: c_int = 4;
pub const DDIR_SYNC_FILE_RANGE: c_int = 5;
pub const DDIR_WAIT: c_int = 6;

// enum fio_ioengine_flags
pub const FIO_SYNCIO: c_int = 1 << 0;
pub const FIO_RAWIO: c_int = 1 << 1;
pub const FIO_DISKLESSIO: c_int = 1 << 2;
pub const FIO_NOEXTEND: c_int = 1 << 3;
pub const FIO_NODISKUTIL: c_int = 1 << 4;
pub const FIO_UNIDIR: c_int = 1 << 5;
pub const FIO_NOIO: c_int = 1 << 6;
pub const FIO_PIPEIO: c_int = 1 << 7;
pub const FIO_BARRIER: c_int = 1 << 8;
pub const FIO_MEMALIGN: c_int = 1 << 9;
pub const FIO_BIT_BASED: c_int = 1 << 10;
pub const FIO_FAKEIO: c_int = 1 << 11;
pub const FIO_NOSTATS: c_int = 1 << 12;
pub const FIO_NOFILEHASH: c_int = 1 << 13;
pub const FIO_ASYNCIO_SYNC_TRIM: c_int = 1 << 14;
pub const FIO_NO_OFFLOAD: c_int = 1 << 15;
pub const FIO_ASYNCIO_SETS_ISSUE_TIME: c_int = 1 << 16;

// enum fio_q_status (a 4-byte int in the ABI)
pub const FIO_Q_COMPLETED: c_int = 0;
pub const FIO_Q_QUEUED: c_int = 1;
pub const FIO_Q_BUSY: c_int = 2;

// enum fio_file_flags
pub const FIO_FILE_OPEN: u32 = 1 << 0;
pub const FIO_FILE_SIZE_KNOWN: u32 = 1 << 4;

// enum fio_opt_type (fio 3.33 numbering)
pub const FIO_OPT_INVALID: u32 = 0;
pub const FIO_OPT_STR: u32 = 1;
/// Integer with size suffixes (k, m, g...), stored as `unsigned long long` (8 bytes).
pub const FIO_OPT_STR_VAL: u32 = 4;
/// `char *` (strdup'd by fio), 8 bytes at `off1`.
pub const FIO_OPT_STR_STORE: u32 = 6;
/// `unsigned int`, 4 bytes at `off1`.
pub const FIO_OPT_INT: u32 = 8;
/// `int`, 4 bytes at `off1`; requires a value (`opt=1`).
pub const FIO_OPT_BOOL: u32 = 10;
/// `int`, 4 bytes at `off1`; a bare `opt` sets 1, `opt=0|1` also accepted.
pub const FIO_OPT_STR_SET: u32 = 12;

/// `enum opt_category` bit for engine options.
pub const FIO_OPT_C_ENGINE: u64 = 64;
/// `FIO_OPT_G_INVALID`: the group used by external engines' options.
pub const FIO_OPT_G_INVALID: u64 = 1 << 40;

pub type SetupFn = unsafe extern "C" fn(*mut ThreadData) -> c_int;
pub type PrepFn = unsafe extern "C" fn(*mut ThreadData, *mut IoU) -> c_int;
pub type QueueFn = unsafe extern "C" fn(*mut ThreadData, *mut IoU) -> c_int;
pub type GeteventsFn = unsafe extern "C" fn(*mut ThreadData, c_uint, c_uint, *const libc::timespec) -> c_int;
pub type EventFn = unsafe extern "C" fn(*mut ThreadData, c_int) -> *mut IoU;
pub type ErrdetailsFn = unsafe extern "C" fn(*mut IoU) -> *mut c_char;
pub type CleanupFn = unsafe extern "C" fn(*mut ThreadData);
pub type FileFn = unsafe extern "C" fn(*mut ThreadData, *mut FioFile) -> c_int;
pub type IoUFreeFn = unsafe extern "C" fn(*mut ThreadData, *mut IoU);
pub type IomemFn = unsafe extern "C" fn(*mut ThreadData, usize) -> c_int;
pub type IomemFreeFn = unsafe extern "C" fn(*mut ThreadData);
/// Callbacks the engine never provides (zoned, prepopulate, terminate...) keep an
/// opaque pointer type: only their slot size matters.
pub type OpaqueFn = unsafe extern "C" fn();

/// `struct ioengine_ops` (264 bytes on x86_64).
#[repr(C)]
pub struct IoengineOps {
    /// `struct flist_head list`: next, prev.
    pub list: [*mut c_void; 2],
    pub name: *const c_char,
    pub version: c_int,
    pub flags: c_int,
    pub dlhandle: *mut c_void,
    pub setup: Option<SetupFn>,
    pub init: Option<SetupFn>,
    pub post_init: Option<SetupFn>,
    pub prep: Option<PrepFn>,
    pub queue: Option<QueueFn>,
    pub commit: Option<SetupFn>,
    pub getevents: Option<GeteventsFn>,
    pub event: Option<EventFn>,
    pub errdetails: Option<ErrdetailsFn>,
    pub cancel: Option<PrepFn>,
    pub cleanup: Option<CleanupFn>,
    pub open_file: Option<FileFn>,
    pub close_file: Option<FileFn>,
    pub invalidate: Option<FileFn>,
    pub unlink_file: Option<FileFn>,
    pub get_file_size: Option<FileFn>,
    pub prepopulate_file: Option<FileFn>,
    pub terminate: Option<CleanupFn>,
    pub iomem_alloc: Option<IomemFn>,
    pub iomem_free: Option<IomemFreeFn>,
    pub io_u_init: Option<PrepFn>,
    pub io_u_free: Option<IoUFreeFn>,
    pub get_zoned_model: Option<OpaqueFn>,
    pub report_zones: Option<OpaqueFn>,
    pub reset_wp: Option<OpaqueFn>,
    pub get_max_open_zones: Option<OpaqueFn>,
    pub option_struct_size: c_int,
    pub options: *mut FioOption,
}

/// `struct io_u` (368 bytes). fio allocates it; the engine only reads and writes the named
/// fields through a pointer. The tail is opaque.
#[repr(C)]
pub struct IoU {
    pub start_time: libc::timespec,
    pub issue_time: libc::timespec,
    pub file: *mut FioFile,
    pub flags: c_uint,
    pub ddir: c_int,
    pub acct_ddir: c_int,
    pub numberio: u16,
    pub ioprio: u16,
    pub clat_prio_index: u16,
    _pad0: [u8; 6],
    pub buflen: u64,
    pub offset: u64,
    pub verify_offset: u64,
    pub buf: *mut c_void,
    pub rand_seed: u64,
    pub xfer_buf: *mut c_void,
    pub xfer_buflen: u64,
    pub buf_filled_len: u64,
    pub ipo: *mut c_void,
    /// Bytes NOT transferred.
    pub resid: u64,
    /// Positive errno, 0 on success.
    pub error: c_uint,
    _pad1: [u8; 4],
    /// `union { unsigned int index; void *engine_data; }`: free for the engine.
    pub engine_data: *mut c_void,
    _rest: [u8; 368 - 160],
}

/// `struct fio_file` (376 bytes). Opaque apart from the fields an engine uses.
#[repr(C)]
pub struct FioFile {
    _hash_list: [*mut c_void; 2],
    pub filetype: c_uint,
    pub fd: c_int,
    _pad0: [u8; 16],
    pub file_name: *mut c_char,
    pub real_file_size: u64,
    pub file_offset: u64,
    pub io_size: u64,
    _pad1: [u8; 168 - 72],
    pub engine_pos: u64,
    pub engine_data: *mut c_void,
    _pad2: [u8; 360 - 184],
    /// Users of the open file (fio's `get_file`/`put_file`); the last `put_file` closes it.
    pub references: c_int,
    pub flags: u32,
    _tail: [u8; 376 - 368],
}

impl FioFile {
    /// An all-zero `fio_file` (no name, no lock, no disk-util link), for a stand-in file
    /// the engine hands to fio itself.
    pub fn zeroed() -> Self {
        // SAFETY: FioFile is plain old data (integers, byte arrays and raw pointers): all
        // zero bytes is a valid value of every field.
        unsafe { std::mem::zeroed() }
    }
}

/// `struct fio_option` (1512 bytes). Unnamed regions (alias, off2..off6, floating limits,
/// callbacks, posval, parent/hide/inverse/verify...) are opaque and left zeroed.
#[repr(C)]
pub struct FioOption {
    pub name: *const c_char,
    pub lname: *const c_char,
    _alias: *const c_char,
    pub type_: u32,
    pub off1: u32,
    _off2_to_6: [u32; 5],
    _pad0: u32,
    pub maxval: u64,
    pub minval: c_int,
    _mid0: [u8; 112 - 68],
    pub help: *const c_char,
    pub def: *const c_char,
    _mid1: [u8; 1464 - 128],
    pub category: u64,
    pub group: u64,
    _tail: [u8; 1512 - 1480],
}

impl FioOption {
    /// The all-zero entry that ends an option array.
    pub const END: FioOption = FioOption {
        name: std::ptr::null(),
        lname: std::ptr::null(),
        _alias: std::ptr::null(),
        type_: FIO_OPT_INVALID,
        off1: 0,
        _off2_to_6: [0; 5],
        _pad0: 0,
        maxval: 0,
        minval: 0,
        _mid0: [0; 112 - 68],
        help: std::ptr::null(),
        def: std::ptr::null(),
        _mid1: [0; 1464 - 128],
        category: 0,
        group: 0,
        _tail: [0; 1512 - 1480],
    };

    /// An engine option: `category = FIO_OPT_C_ENGINE`, `group = FIO_OPT_G_INVALID`.
    #[allow(clippy::too_many_arguments)]
    pub const fn engine(
        name: &'static std::ffi::CStr,
        lname: &'static std::ffi::CStr,
        type_: u32,
        off1: usize,
        minval: c_int,
        maxval: u64,
        help: &'static std::ffi::CStr,
        def: Option<&'static std::ffi::CStr>,
    ) -> FioOption {
        let mut o = FioOption::END;
        o.name = name.as_ptr();
        o.lname = lname.as_ptr();
        o.type_ = type_;
        o.off1 = off1 as u32;
        o.minval = minval;
        o.maxval = maxval;
        o.help = help.as_ptr();
        o.def = match def {
            Some(d) => d.as_ptr(),
            None => std::ptr::null(),
        };
        o.category = FIO_OPT_C_ENGINE;
        o.group = FIO_OPT_G_INVALID;
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn ioengine_ops_layout() {
        assert_eq!(size_of::<IoengineOps>(), 264);
        assert_eq!(offset_of!(IoengineOps, list), 0);
        assert_eq!(offset_of!(IoengineOps, name), 16);
        assert_eq!(offset_of!(IoengineOps, version), 24);
        assert_eq!(offset_of!(IoengineOps, flags), 28);
        assert_eq!(offset_of!(IoengineOps, dlhandle), 32);
        // Function pointers from 40, 8 bytes each, in declaration order.
        let fns = [
            offset_of!(IoengineOps, setup),
            offset_of!(IoengineOps, init),
            offset_of!(IoengineOps, post_init),
            offset_of!(IoengineOps, prep),
            offset_of!(IoengineOps, queue),
            offset_of!(IoengineOps, commit),
            offset_of!(IoengineOps, getevents),
            offset_of!(IoengineOps, event),
            offset_of!(IoengineOps, errdetails),
            offset_of!(IoengineOps, cancel),
            offset_of!(IoengineOps, cleanup),
            offset_of!(IoengineOps, open_file),
            offset_of!(IoengineOps, close_file),
            offset_of!(IoengineOps, invalidate),
            offset_of!(IoengineOps, unlink_file),
            offset_of!(IoengineOps, get_file_size),
            offset_of!(IoengineOps, prepopulate_file),
            offset_of!(IoengineOps, terminate),
            offset_of!(IoengineOps, iomem_alloc),
            offset_of!(IoengineOps, iomem_free),
            offset_of!(IoengineOps, io_u_init),
            offset_of!(IoengineOps, io_u_free),
            offset_of!(IoengineOps, get_zoned_model),
            offset_of!(IoengineOps, report_zones),
            offset_of!(IoengineOps, reset_wp),
            offset_of!(IoengineOps, get_max_open_zones),
        ];
        for (i, off) in fns.iter().enumerate() {
            assert_eq!(*off, 40 + 8 * i, "function pointer #{i}");
        }
        assert_eq!(offset_of!(IoengineOps, queue), 72);
        assert_eq!(offset_of!(IoengineOps, get_max_open_zones), 240);
        assert_eq!(offset_of!(IoengineOps, option_struct_size), 248);
        assert_eq!(offset_of!(IoengineOps, options), 256);
        assert_eq!(size_of::<Option<QueueFn>>(), 8);
    }

    #[test]
    fn io_u_layout() {
        assert_eq!(size_of::<IoU>(), 368);
        assert_eq!(offset_of!(IoU, start_time), 0);
        assert_eq!(offset_of!(IoU, issue_time), 16);
        assert_eq!(offset_of!(IoU, file), 32);
        assert_eq!(offset_of!(IoU, flags), 40);
        assert_eq!(offset_of!(IoU, ddir), 44);
        assert_eq!(offset_of!(IoU, acct_ddir), 48);
        assert_eq!(offset_of!(IoU, numberio), 52);
        assert_eq!(offset_of!(IoU, ioprio), 54);
        assert_eq!(offset_of!(IoU, clat_prio_index), 56);
        assert_eq!(offset_of!(IoU, buflen), 64);
        assert_eq!(offset_of!(IoU, offset), 72);
        assert_eq!(offset_of!(IoU, verify_offset), 80);
        assert_eq!(offset_of!(IoU, buf), 88);
        assert_eq!(offset_of!(IoU, rand_seed), 96);
        assert_eq!(offset_of!(IoU, xfer_buf), 104);
        assert_eq!(offset_of!(IoU, xfer_buflen), 112);
        assert_eq!(offset_of!(IoU, buf_filled_len), 120);
        assert_eq!(offset_of!(IoU, ipo), 128);
        assert_eq!(offset_of!(IoU, resid), 136);
        assert_eq!(offset_of!(IoU, error), 144);
        assert_eq!(offset_of!(IoU, engine_data), 152);
    }

    #[test]
    fn fio_file_layout() {
        assert_eq!(size_of::<FioFile>(), 376);
        assert_eq!(offset_of!(FioFile, fd), 20);
        assert_eq!(offset_of!(FioFile, file_name), 40);
        assert_eq!(offset_of!(FioFile, real_file_size), 48);
        assert_eq!(offset_of!(FioFile, file_offset), 56);
        assert_eq!(offset_of!(FioFile, io_size), 64);
        assert_eq!(offset_of!(FioFile, engine_pos), 168);
        assert_eq!(offset_of!(FioFile, engine_data), 176);
        assert_eq!(offset_of!(FioFile, references), 360);
        assert_eq!(offset_of!(FioFile, flags), 364);
    }

    #[test]
    fn fio_option_layout() {
        assert_eq!(size_of::<FioOption>(), 1512);
        assert_eq!(offset_of!(FioOption, name), 0);
        assert_eq!(offset_of!(FioOption, lname), 8);
        assert_eq!(offset_of!(FioOption, type_), 24);
        assert_eq!(offset_of!(FioOption, off1), 28);
        assert_eq!(offset_of!(FioOption, maxval), 56);
        assert_eq!(offset_of!(FioOption, minval), 64);
        assert_eq!(offset_of!(FioOption, help), 112);
        assert_eq!(offset_of!(FioOption, def), 120);
        assert_eq!(offset_of!(FioOption, category), 1464);
        assert_eq!(offset_of!(FioOption, group), 1472);
    }

    #[test]
    fn constants() {
        assert_eq!(FIO_IOOPS_VERSION, 31);
        assert_eq!(
            [DDIR_READ, DDIR_WRITE, DDIR_TRIM, DDIR_SYNC, DDIR_DATASYNC, DDIR_SYNC_FILE_RANGE, DDIR_WAIT],
            [0, 1, 2, 3, 4, 5, 6]
        );
        assert_eq!((FIO_Q_COMPLETED, FIO_Q_QUEUED, FIO_Q_BUSY), (0, 1, 2));
        assert_eq!(FIO_DISKLESSIO, 4);
        assert_eq!(FIO_NOEXTEND, 8);
        assert_eq!(FIO_NODISKUTIL, 16);
        assert_eq!(FIO_FAKEIO, 2048);
        assert_eq!(FIO_NO_OFFLOAD, 1 << 15);
        assert_eq!(FIO_ASYNCIO_SETS_ISSUE_TIME, 1 << 16);
        assert_eq!(FIO_FILE_SIZE_KNOWN, 16);
        assert_eq!((FIO_OPT_STR, FIO_OPT_STR_STORE, FIO_OPT_INT, FIO_OPT_BOOL, FIO_OPT_STR_SET), (1, 6, 8, 10, 12));
        assert_eq!(FIO_OPT_C_ENGINE, 64);
        assert_eq!(FIO_OPT_G_INVALID, 1u64 << 40);
    }
}
