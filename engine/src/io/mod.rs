//! I/O layer: io_uring ring, O_DIRECT files, aligned buffers.
