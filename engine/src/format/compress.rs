//! Compressed cluster payloads (spec: "Compressed Clusters Descriptor"; compression type
//! header field): raw deflate (no zlib header) or zstd frames.

use super::header::CompressionType;
use crate::{Error, Result};
use std::io::Read;

/// Decompresses `input` (the bytes named by a compressed descriptor, possibly with trailing
/// padding) into exactly `out.len()` bytes (one cluster).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Deflate => {
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| Error::corrupt("compressed cluster", format!("deflate stream is invalid: {e}")))?;
            if (d.total_out() as usize) < out.len() {
                return Err(Error::corrupt(
                    "compressed cluster",
                    format!("deflate stream gave {} bytes, expected {} ({status:?})", d.total_out(), out.len()),
                ));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| Error::corrupt("compressed cluster", format!("zstd stream is invalid: {e}")))?
                .single_frame();
            dec.read_exact(out)
                .map_err(|e| Error::corrupt("compressed cluster", format!("zstd stream is invalid or short: {e}")))
        }
    }
}

/// Compresses one cluster. Returns `None` when the result is not smaller than the input
/// (such clusters are stored uncompressed, as QEMU does).
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Deflate => match deflate_qemu(input) {
            Some(out) => out,
            None => return Ok(None),
        },
        CompressionType::Zstd => zstd::bulk::compress(input, 0).map_err(|e| Error::io("zstd compress", e))?,
    };
    Ok(if out.len() < input.len() { Some(out) } else { None })
}

/// Raw deflate with QEMU's parameters (`qcow2_compress`: deflateInit2(Z_DEFAULT_COMPRESSION,
/// Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY)) through the system zlib, the library QEMU uses, so
/// a cluster compresses to the bytes qemu-img writes. `None` when the stream does not fit in
/// less than the input (it is then stored uncompressed, as QEMU does).
fn deflate_qemu(input: &[u8]) -> Option<Vec<u8>> {
    use libz_sys as z;
    let cap = input.len().checked_sub(1)?;
    let mut out = vec![0u8; cap];
    // zlib wants zalloc/zfree NULL for its default allocator; libz-sys types them as
    // non-null fn pointers, so the stream lives only behind a raw pointer and never becomes
    // a Rust value (fields are written and read through the pointer).
    let mut mem = std::mem::MaybeUninit::<z::z_stream>::zeroed();
    let st = mem.as_mut_ptr();
    // SAFETY: st points to zeroed memory of a z_stream (Z_NULL allocators); the version
    // string and size are zlib's own.
    let rc = unsafe {
        z::deflateInit2_(
            st,
            z::Z_DEFAULT_COMPRESSION,
            z::Z_DEFLATED,
            -12,
            9,
            z::Z_DEFAULT_STRATEGY,
            z::zlibVersion(),
            std::mem::size_of::<z::z_stream>() as i32,
        )
    };
    if rc != z::Z_OK {
        return None;
    }
    // SAFETY: field writes through the raw pointer into the initialized stream; next_in and
    // next_out point into `input` and `out`, valid for the lengths given, and both outlive
    // the stream (ended right below).
    let (rc, n) = unsafe {
        std::ptr::addr_of_mut!((*st).next_in).write(input.as_ptr() as *mut u8);
        std::ptr::addr_of_mut!((*st).avail_in).write(input.len() as u32);
        std::ptr::addr_of_mut!((*st).next_out).write(out.as_mut_ptr());
        std::ptr::addr_of_mut!((*st).avail_out).write(cap as u32);
        let rc = z::deflate(st, z::Z_FINISH);
        let n = std::ptr::addr_of!((*st).total_out).read() as usize;
        z::deflateEnd(st);
        (rc, n)
    };
    if rc != z::Z_STREAM_END {
        return None; // did not fit
    }
    out.truncate(n);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn roundtrip(zstd in any::<bool>(), seed in any::<u8>(), runs in 1usize..50) {
            let kind = if zstd { CompressionType::Zstd } else { CompressionType::Deflate };
            let mut input = vec![0u8; 65536];
            for (i, b) in input.iter_mut().enumerate() { *b = if (i / 1000) % runs == 0 { seed } else { (i % 7) as u8 }; }
            if let Some(c) = compress(kind, &input).unwrap() {
                let mut padded = c.clone();
                padded.extend_from_slice(&[0xaa; 300]);
                let mut out = vec![0u8; 65536];
                decompress(kind, &padded, &mut out).unwrap();
                prop_assert_eq!(out, input);
            }
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Deflate, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
