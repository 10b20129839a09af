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

/// How deflate clusters are made. Both write raw deflate streams that never reach more than
/// 4096 bytes back (windowBits 12: QEMU inflates compressed clusters with a 4 KiB window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeflateProfile {
    /// The system zlib with QEMU's parameters: the bytes qemu-img writes.
    Qemu,
    /// zlib-rs's lazy matcher with its 3-byte rolling hash (what its level 9 uses), tuned
    /// to zlib's level 6 searches (good 8, lazy 16, nice 128, chain 128). CPU time against
    /// `Qemu`, 64 KiB clusters: 0.71x for +0.01% bytes on /usr/lib contents, 0.68x for
    /// +0.1% on repetitive text. Shorter searches (4, 16, 64, 32) take 0.52x for +0.6% on
    /// /usr/lib but +7% on the text; zlib-rs's level 6 (its "medium" matcher, 4-byte hash):
    /// 0.37x for +2.9% on /usr/lib.
    Fast,
}

/// The deflate profile in use: `QURING_DEFLATE=qemu|fast` picks one (for side-by-side
/// measurements), otherwise [`DEFAULT_DEFLATE`].
pub fn deflate_profile() -> DeflateProfile {
    static P: std::sync::OnceLock<DeflateProfile> = std::sync::OnceLock::new();
    *P.get_or_init(|| match std::env::var("QURING_DEFLATE").as_deref() {
        Ok("qemu") => DeflateProfile::Qemu,
        Ok("fast") => DeflateProfile::Fast,
        _ => DEFAULT_DEFLATE,
    })
}

/// The profile used unless `QURING_DEFLATE` says otherwise: Qemu (qemu-img's bytes). Fast
/// is within 0.1% of its size but not yet at issue 16's 0.6x time (README, "convert").
pub const DEFAULT_DEFLATE: DeflateProfile = DeflateProfile::Qemu;

/// Compresses one cluster. Returns `None` when the result is not smaller than the input
/// (such clusters are stored uncompressed, as QEMU does).
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    compress_with(kind, deflate_profile(), input)
}

/// [`compress`] with an explicit deflate profile (ignored for zstd).
pub fn compress_with(kind: CompressionType, profile: DeflateProfile, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Deflate => match match profile {
            DeflateProfile::Qemu => deflate_qemu(input),
            DeflateProfile::Fast => deflate_fast(input),
        } {
            Some(out) => out,
            None => return Ok(None),
        },
        CompressionType::Zstd => zstd::bulk::compress(input, 0).map_err(|e| Error::io("zstd compress", e))?,
    };
    Ok(if out.len() < input.len() { Some(out) } else { None })
}

/// The Fast profile's deflateTune parameters (good, lazy, nice, chain): zlib's level 6
/// searches, or `QURING_DEFLATE_TUNE=G,L,N,C` for measurements of other settings (each a
/// number from 1 to 258 for the lengths, 1 to 4096 for the chain; anything else is ignored).
fn fast_tune() -> [i32; 4] {
    static T: std::sync::OnceLock<[i32; 4]> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        let parse = |v: &str| -> Option<[i32; 4]> {
            let n: Vec<i32> = v.split(',').map(|x| x.trim().parse().ok()).collect::<Option<_>>()?;
            let t: [i32; 4] = n.try_into().ok()?;
            (t[..3].iter().all(|&x| (1..=258).contains(&x)) && (1..=4096).contains(&t[3])).then_some(t)
        };
        std::env::var("QURING_DEFLATE_TUNE").ok().and_then(|v| parse(&v)).unwrap_or([8, 16, 128, 128])
    })
}

/// Raw deflate through zlib-rs ([`DeflateProfile::Fast`]): level 9 (its lazy matcher and
/// rolling 3-byte hash) with windowBits -12 and memLevel 9 as QEMU, then deflateTune to
/// shorter searches. `None` when the stream does not fit in less than the input.
fn deflate_fast(input: &[u8]) -> Option<Vec<u8>> {
    use libz_rs_sys as z;
    let cap = input.len().checked_sub(1)?;
    let avail_in = u32::try_from(input.len()).ok()?;
    let mut out = vec![0u8; cap];
    let mut st = z::z_stream::default();
    // SAFETY: st is a default z_stream (allocators chosen by zlib-rs); version and size
    // are the library's own.
    let rc = unsafe {
        z::deflateInit2_(
            &mut st,
            9,
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
    st.next_in = input.as_ptr();
    st.avail_in = avail_in;
    st.next_out = out.as_mut_ptr();
    st.avail_out = cap as u32;
    // SAFETY: st was initialized above; next_in and next_out point into `input` and `out`,
    // valid for the lengths given, and both outlive the stream (ended right below).
    let (rc, n) = unsafe {
        let [good, lazy, nice, chain] = fast_tune();
        z::deflateTune(&mut st, good, lazy, nice, chain);
        let rc = z::deflate(&mut st, z::Z_FINISH);
        let n = st.total_out as usize;
        z::deflateEnd(&mut st);
        (rc, n)
    };
    if rc != z::Z_STREAM_END {
        return None; // did not fit
    }
    out.truncate(n);
    Some(out)
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

    /// Inflates `c` as QEMU can: raw deflate with a 4 KiB window (windowBits -12, the system
    /// zlib), one output byte per call so that every back-reference must be served from the
    /// 4 KiB window (a whole-cluster output buffer would serve any distance).
    fn inflate_4k_window(c: &[u8], len: usize) -> std::result::Result<Vec<u8>, String> {
        use libz_sys as z;
        let mut out = vec![0u8; len];
        let mut mem = std::mem::MaybeUninit::<z::z_stream>::zeroed();
        let st = mem.as_mut_ptr();
        // SAFETY: zeroed z_stream (Z_NULL allocators), zlib's own version and size; the
        // pointers set below stay within `c` and `out`, which outlive the stream.
        unsafe {
            let rc = z::inflateInit2_(st, -12, z::zlibVersion(), std::mem::size_of::<z::z_stream>() as i32);
            assert_eq!(rc, z::Z_OK);
            std::ptr::addr_of_mut!((*st).next_in).write(c.as_ptr() as *mut u8);
            std::ptr::addr_of_mut!((*st).avail_in).write(c.len() as u32);
            let mut rc = z::Z_OK;
            for i in 0..len {
                std::ptr::addr_of_mut!((*st).next_out).write(out.as_mut_ptr().add(i));
                std::ptr::addr_of_mut!((*st).avail_out).write(1);
                rc = z::inflate(st, z::Z_NO_FLUSH);
                if rc != z::Z_OK && rc != z::Z_STREAM_END {
                    break;
                }
            }
            let total = std::ptr::addr_of!((*st).total_out).read() as usize;
            z::inflateEnd(st);
            if rc != z::Z_STREAM_END || total != len {
                return Err(format!("inflate with a 4 KiB window: rc {rc} after {total} of {len} bytes"));
            }
        }
        Ok(out)
    }

    /// 64 KiB of noise in which each 1 KiB block at 8 KiB steps repeats the first one:
    /// compressible only through back-references 8 KiB long and more.
    fn far_repeats() -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut v: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let head = v[..1024].to_vec();
        for k in 1..8 {
            v[k * 8192..k * 8192 + 1024].copy_from_slice(&head);
        }
        v
    }

    #[test]
    fn window_check_catches_far_references() {
        // A 32 KiB-window stream of the same data references 8 KiB back: the check refuses it.
        let input = far_repeats();
        let mut c = flate2::Compress::new(flate2::Compression::new(6), false);
        let mut wide = Vec::with_capacity(70000);
        c.compress_vec(&input, &mut wide, flate2::FlushCompress::Finish).unwrap();
        assert!(wide.len() < input.len() - 4096, "the wide stream uses the repeats ({} bytes)", wide.len());
        assert!(inflate_4k_window(&wide, input.len()).is_err());
    }

    #[test]
    fn deflate_never_reaches_past_4k() {
        // Far repeats, near repeats, and real binary data (this test program) by clusters.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let mut inputs = vec![far_repeats()];
        let mut near = far_repeats();
        for k in 1..32 {
            near.copy_within(0..1024, k * 2048);
        }
        inputs.push(near);
        inputs.extend(exe.chunks_exact(65536).take(48).map(|c| c.to_vec()));
        inputs.extend(exe.chunks_exact(4096).take(16).map(|c| c.to_vec()));
        for profile in [DeflateProfile::Qemu, DeflateProfile::Fast] {
            let mut compressed = 0;
            for input in &inputs {
                if let Some(c) = compress_with(CompressionType::Deflate, profile, input).unwrap() {
                    compressed += 1;
                    let back = inflate_4k_window(&c, input.len()).unwrap_or_else(|e| panic!("{profile:?}: {e}"));
                    assert!(back == *input, "{profile:?}: inflated data differs");
                }
            }
            assert!(compressed > inputs.len() / 2, "{profile:?}: {compressed} of {} compressed", inputs.len());
        }
    }

    #[test]
    fn fast_profile_size_is_close() {
        // Fast stays within 1% of QEMU's bytes on a binary (this test program) and on
        // repetitive text (where short searches lose most).
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let mut text = Vec::new();
        let mut x = 7u64;
        while text.len() < 4 << 20 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.extend_from_slice(format!("word{} ", (x >> 33) % 40).as_bytes());
        }
        let (mut q, mut f) = (0usize, 0usize);
        for c in exe.chunks_exact(65536).take(64).chain(text.chunks_exact(65536)) {
            q += compress_with(CompressionType::Deflate, DeflateProfile::Qemu, c).unwrap().map_or(c.len(), |v| v.len());
            f += compress_with(CompressionType::Deflate, DeflateProfile::Fast, c).unwrap().map_or(c.len(), |v| v.len());
        }
        assert!(f * 1000 <= q * 1010, "fast {f} bytes against qemu {q}");
    }
}
