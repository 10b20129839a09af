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
        CompressionType::Deflate => {
            // QEMU's parameters: deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
            // Z_DEFAULT_STRATEGY), a raw stream that must fit in less than the input.
            let config = zlib_rs::DeflateConfig {
                level: 6,
                method: zlib_rs::Method::Deflated,
                window_bits: -12,
                mem_level: 9,
                strategy: zlib_rs::Strategy::Default,
            };
            let mut out = vec![0u8; input.len().saturating_sub(1)];
            let (done, rc) = zlib_rs::compress_slice(&mut out, input, config);
            if rc != zlib_rs::ReturnCode::Ok {
                return Ok(None); // did not fit: not worth compressing
            }
            let n = done.len();
            out.truncate(n);
            out
        }
        CompressionType::Zstd => zstd::bulk::compress(input, 0).map_err(|e| Error::io("zstd compress", e))?,
    };
    Ok(if out.len() < input.len() { Some(out) } else { None })
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
