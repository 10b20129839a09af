//! Image identity (quring's identity extension, docs/identity.md): each link of a chain is
//! checked when it is opened (the backing image's GUID against the one the overlay
//! recorded), a missing or replaced backing image is searched for by GUID in
//! [`Options::backing_search`], and the recorded backing length bounds what the backing
//! image shows.

use super::open::open_backing;
use super::*;
use crate::format::identity::{Guid, Identity};

impl Image {
    /// This image's identity extension (None: it has none).
    pub fn identity(&self) -> Option<Identity> {
        self.identity.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Are the identity extension's backing fields stale? True when the header names a
    /// backing file other than the one they were recorded for: a tool that does not know
    /// the extension (`qemu-img rebase`, `qemu-img amend -o backing_file=`) changed it.
    /// The GUID check and the backing length are then not applied.
    pub fn identity_stale(&self) -> bool {
        let h = self.header();
        self.identity().is_some_and(|id| !id.backing_current(h.backing_file.as_deref()))
    }

    /// The recorded backing length (None: no identity, or no backing file).
    pub fn backing_length(&self) -> Option<u64> {
        let id = self.identity()?;
        self.header().backing_file.as_ref().map(|_| id.backing_len)
    }

    /// A shrink to `new_size` lowers the recorded backing length to it (the header update
    /// `h` is about to be written; the limit in memory follows).
    pub(crate) fn shrink_identity(&self, h: &mut Header, new_size: u64) {
        let mut cur = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = cur.as_mut()
            && h.backing_file.is_some()
            && id.backing_len > new_size
        {
            id.backing_len = new_size;
            h.set_identity(Some(id));
            self.backing_limit.store(limit_of(id.backing_len), Ordering::Release);
        }
    }
}

/// The read limit of a recorded backing length (whole 512-byte sectors).
pub(super) fn limit_of(len: u64) -> u64 {
    len.div_ceil(512).saturating_mul(512)
}

/// The GUID of an open backing layer (None: raw, or qcow2 without the extension).
fn guid_of(b: &Backing) -> Option<Guid> {
    match b {
        Backing::Qcow2(i) => i.identity().map(|id| id.guid),
        Backing::Raw(_) => None,
    }
}

/// Opens the backing file `name` of `image` and checks it against `want` (the backing GUID
/// the image recorded; None: nothing to check). A missing file or another GUID is looked
/// for in `opts.backing_search`; otherwise the open fails naming both GUIDs and paths.
pub(super) fn open_checked_backing(
    image: &Path,
    name: &str,
    fmt: Option<&str>,
    opts: &Options,
    depth: usize,
    want: Option<Guid>,
) -> Result<Backing> {
    let want = want.filter(|g| !g.is_nil() && opts.backing_identity == IdentityPolicy::Check);
    let path = resolve_backing_path(image, name);
    let first = open_backing(image, name, fmt, opts, depth);
    let Some(want) = want else { return first };
    let problem = match first {
        Ok(b) => match guid_of(&b) {
            Some(g) if g == want => return Ok(b),
            Some(g) => format!(
                "backing file '{}' has GUID {g}, but '{}' was made on the image with GUID {want}",
                path.display(),
                image.display()
            ),
            None => format!(
                "backing file '{}' has no GUID (no quring identity extension: another file, or one \
                 rewritten by a tool that drops unknown header extensions), but '{}' was made on the \
                 image with GUID {want}",
                path.display(),
                image.display()
            ),
        },
        Err(e) if opts.backing_search.is_empty() => return Err(e),
        Err(e) => e.to_string(),
    };
    if let Some(found) = search(&opts.backing_search, want)? {
        return open_backing(image, &found.display().to_string(), fmt, opts, depth);
    }
    let searched = if opts.backing_search.is_empty() {
        String::new()
    } else {
        let dirs: Vec<String> = opts.backing_search.iter().map(|d| format!("'{}'", d.display())).collect();
        format!("; no image with GUID {want} in {}", dirs.join(", "))
    };
    Err(Error::BackingMismatch(format!("{problem}{searched} (-o backing-identity=ignore opens it anyway)")))
}

/// Looks for the image whose identity extension carries `want` in `dirs` (what
/// [`Options::backing_search`] does when a chain is opened; `rebase -u --backing-search`
/// records the path it finds). Reads at most 64 KiB of each file.
pub fn find_by_guid(dirs: &[PathBuf], want: Guid) -> Result<Option<PathBuf>> {
    search(dirs, want)
}

/// Looks for the image with GUID `want` in `dirs` (regular files, at most
/// [`MAX_SEARCH_ENTRIES`] entries per directory), reading only the first cluster of each.
fn search(dirs: &[PathBuf], want: Guid) -> Result<Option<PathBuf>> {
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else { continue };
        for ent in rd.take(MAX_SEARCH_ENTRIES).flatten() {
            let p = ent.path();
            if !ent.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if header_guid(&p) == Some(want) {
                return Ok(Some(p));
            }
        }
    }
    Ok(None)
}

/// The GUID in the header of the image at `p` (None: not a qcow2 image with a valid
/// identity extension). Reads at most the first 64 KiB: the magic, the header length and
/// the extensions after it (the search reads no more of any file).
pub fn header_guid(p: &Path) -> Option<Guid> {
    use crate::format::bytes::be32;
    use crate::format::extension::parse_extensions;
    use crate::format::identity::EXT_IDENTITY;
    use std::io::Read;
    const MAX: u64 = 64 << 10;
    let f = std::fs::File::open(p).ok()?;
    let mut buf = Vec::new();
    f.take(MAX).read_to_end(&mut buf).ok()?;
    let cs = Header::peek_cluster_size(&buf).ok()?;
    let end = (cs as usize).min(buf.len());
    let hl = match be32(&buf, 4) {
        2 => crate::format::header::V2_HEADER_LENGTH as usize,
        _ if buf.len() >= 104 => be32(&buf, 100) as usize,
        _ => return None,
    };
    if hl > end {
        return None;
    }
    let (exts, _) = parse_extensions(&buf, hl, end).ok()?;
    let mut ids = exts.iter().filter(|e| e.kind == EXT_IDENTITY);
    let id = Identity::parse(&ids.next()?.data).ok()?;
    ids.next().is_none().then_some(id.guid)
}
