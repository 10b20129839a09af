//! Changing the backing file named in the header (`qemu-img rebase`'s header update, QEMU's
//! `bdrv_change_backing_file`): the name, the backing format extension and quring's identity
//! extension's backing fields (docs/identity.md, "Rules for writers" 4), in one header write.

use super::*;
use crate::format::identity::Guid;

/// The backing file an image is switched to by [`Image::set_backing_file`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBacking {
    /// The name stored in the header (relative names resolve against the image's directory).
    pub name: String,
    /// Its format (the backing format extension); None removes the extension.
    pub format: Option<String>,
    /// The identity extension's backing GUID: the new backing image's GUID (nil: it has none
    /// or it could not be read).
    pub guid: Guid,
    /// The identity extension's backing length: the bytes of the new backing image this
    /// image shows.
    pub len: u64,
}

impl Image {
    /// Points the header at another backing file (None: no backing file) in one header
    /// write, rewriting the identity extension's backing fields (GUID, length, name hash; all
    /// zero without a backing file) when the image has the extension. Only the header
    /// changes: what the image shows afterwards is up to the caller (`rebase` copies what
    /// differs first). The backing chain this `Image` opened is not reopened: close it after.
    pub fn set_backing_file(&self, new: Option<&NewBacking>) -> Result<()> {
        self.check_writable()?;
        let mut id = self.identity();
        if let Some(id) = id.as_mut() {
            match new {
                Some(b) => id.set_backing(b.guid, b.len.min(i64::MAX as u64), &b.name),
                None => {
                    id.backing_guid = Guid::default();
                    id.backing_len = 0;
                    id.backing_name_hash = 0;
                }
            }
        }
        self.update_header(&self.counters, |h| {
            h.backing_file = new.map(|b| b.name.clone());
            h.set_backing_format(new.and_then(|b| b.format.as_deref()));
            if id.is_some() {
                h.set_identity(id.as_ref());
            }
        })?;
        let limit = match (&id, new) {
            (Some(id), Some(_)) => super::identity::limit_of(id.backing_len),
            _ => u64::MAX,
        };
        self.backing_limit.store(limit, Ordering::Release);
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = id;
        Ok(())
    }
}
