//! Snapshot files: one raft `Snapshot` (metadata + data) per file under `<data_dir>/snapshots/`.
//!
//! A file is written to a temporary name, fsynced, renamed into place and the directory fsynced, so a
//! crash leaves either the old or the new snapshot, never a torn one. The file carries a magic, a
//! length and a crc32c so that a damaged file is detected at load instead of being applied. Older
//! snapshot files are deleted once a newer one is recorded in the log store (crypto-shred relies on
//! it: an old snapshot may hold a wrapped key that has since been deleted).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::PathBuf;

use protobuf::Message as _;
use raft::eraftpb::Snapshot;

const FILE_MAGIC: &[u8; 8] = b"SLRSNAP1";
const HEADER_LEN: usize = 8 + 8 + 4;
/// Upper bound on a snapshot file (the metadata state is small; this guards the allocation at load).
const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

#[derive(Debug)]
pub(crate) struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        crate::fsutil::create_private_dir(&dir)?;
        // Leftover temporary files from a crash mid-write are garbage.
        for e in fs::read_dir(&dir)? {
            let e = e?;
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                fs::remove_file(e.path())?;
            }
        }
        Ok(Self { dir })
    }

    fn path_for(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("snap-{index:020}-{term:020}.bin"))
    }

    /// Durably write `snap` (temp file + fsync + rename + fsync dir).
    pub fn save(&self, snap: &Snapshot) -> std::io::Result<()> {
        let m = snap.get_metadata();
        let body = snap.write_to_bytes().map_err(std::io::Error::other)?;
        let final_path = self.path_for(m.index, m.term);
        let tmp = final_path.with_extension("tmp");
        {
            let mut f = crate::fsutil::create_private_file(&tmp)?;
            let mut header = Vec::with_capacity(HEADER_LEN);
            header.extend_from_slice(FILE_MAGIC);
            header.extend_from_slice(&(body.len() as u64).to_be_bytes());
            header.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
            f.write_all(&header)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &final_path)?;
        File::open(&self.dir)?.sync_all()
    }

    /// Load the snapshot recorded at (index, term).
    pub fn load(&self, index: u64, term: u64) -> std::io::Result<Snapshot> {
        let path = self.path_for(index, term);
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {m}", path.display()));
        let mut f = File::open(&path)?;
        let mut header = [0u8; HEADER_LEN];
        f.read_exact(&mut header)?;
        if &header[..8] != FILE_MAGIC {
            return Err(bad("bad magic"));
        }
        let len = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        let crc = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        if len > MAX_SNAPSHOT_BYTES || len != f.metadata()?.len() - HEADER_LEN as u64 {
            return Err(bad("bad length"));
        }
        let mut body = vec![0u8; len as usize];
        f.read_exact(&mut body)?;
        if crc32c::crc32c(&body) != crc {
            return Err(bad("checksum mismatch"));
        }
        let snap = Snapshot::parse_from_bytes(&body).map_err(|_| bad("undecodable"))?;
        if snap.get_metadata().index != index || snap.get_metadata().term != term {
            return Err(bad("metadata does not match the file name"));
        }
        Ok(snap)
    }

    /// Delete every snapshot file except the one at (index, term).
    pub fn remove_all_but(&self, index: u64, term: u64) -> std::io::Result<()> {
        let keep = self.path_for(index, term);
        let mut removed = false;
        for e in fs::read_dir(&self.dir)? {
            let p = e?.path();
            if p != keep {
                fs::remove_file(&p)?;
                removed = true;
            }
        }
        if removed {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::many_single_char_names)]
    fn save_load_and_detect_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let d = SnapshotDir::open(tmp.path().join("s")).unwrap();
        let mut s = Snapshot::default();
        s.mut_metadata().index = 9;
        s.mut_metadata().term = 2;
        s.data = b"hello".to_vec().into();
        d.save(&s).unwrap();
        assert_eq!(d.load(9, 2).unwrap(), s);
        let p = d.path_for(9, 2);
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(d.load(9, 2).is_err());
        s.mut_metadata().index = 10;
        d.save(&s).unwrap();
        d.remove_all_but(10, 2).unwrap();
        assert!(d.load(9, 2).is_err());
        assert!(d.load(10, 2).is_ok());
        assert_eq!(fs::read_dir(d.dir()).unwrap().count(), 1);
    }
}
