//! Reads a `tcpdump -w` capture and checks what went over the wire: the TCP
//! streams it holds, reassembled by sequence number, and whether a stream is
//! made of TLS records and nothing else.
//!
//! Only what Slate's tests capture is understood: classic pcap files (either
//! byte order, microsecond or nanosecond stamps), Ethernet (`-i lo`) or Linux
//! cooked (`-i any`) frames, IPv4 and IPv6, TCP.

use std::collections::BTreeMap;
use std::path::Path;

/// One direction of one TCP connection: `(source, destination)` as `ip:port`.
pub type Direction = (String, String);

/// The payload bytes of every TCP direction in `path`, in sequence order.
/// Retransmitted bytes are counted once; a gap (a packet the capture missed)
/// is an error, since a checker could then not see every byte.
pub fn tcp_streams(path: &Path) -> Result<BTreeMap<Direction, Vec<u8>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if data.len() < 24 {
        return Err("not a pcap file (too short)".into());
    }
    let magic = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => return Err(format!("not a classic pcap file (magic {m:#x})")),
    };
    let u32_at = |b: &[u8], at: usize| -> u32 {
        let a: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(&data, 20);
    let mut at = 24;
    // Per direction: segments by sequence number, and the first sequence number seen.
    let mut segments: BTreeMap<Direction, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
    // Each direction's last sequence number, as captured and unwrapped: TCP starts at a random
    // 32-bit number, so a few hundred MiB may wrap it.
    let mut last: BTreeMap<Direction, (u32, u64)> = BTreeMap::new();
    while at + 16 <= data.len() {
        let caplen = u32_at(&data, at + 8) as usize;
        let origlen = u32_at(&data, at + 12) as usize;
        at += 16;
        let frame = data.get(at..at + caplen).ok_or("truncated packet record")?;
        at += caplen;
        if caplen < origlen {
            return Err(format!("a packet was cut to {caplen} of {origlen} bytes: capture with -s 0"));
        }
        let ip = match linktype {
            1 if frame.len() >= 14 => (u16::from_be_bytes([frame[12], frame[13]]), &frame[14..]),
            113 if frame.len() >= 16 => (u16::from_be_bytes([frame[14], frame[15]]), &frame[16..]),
            1 | 113 => continue,
            other => return Err(format!("link type {other} is not understood")),
        };
        let Some((src, dst, tcp)) = ip_payload(ip.0, ip.1) else { continue };
        if tcp.len() < 20 {
            continue;
        }
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        let seq = u32::from_be_bytes(tcp[4..8].try_into().expect("4 bytes"));
        let off = usize::from(tcp[12] >> 4) * 4;
        let payload = tcp.get(off..).unwrap_or_default();
        if payload.is_empty() {
            continue;
        }
        let dir = (format!("{src}:{sport}"), format!("{dst}:{dport}"));
        let abs = unwrap_seq(last.get(&dir).copied(), seq);
        last.insert(dir.clone(), (seq, abs));
        segments.entry(dir).or_default().entry(abs).or_insert_with(|| payload.to_vec());
    }
    let mut out = BTreeMap::new();
    for (dir, segs) in segments {
        out.insert(dir.clone(), reassemble(&segs).map_err(|e| format!("{} -> {}: {e}", dir.0, dir.1))?);
    }
    Ok(out)
}

fn ip_payload(ethertype: u16, ip: &[u8]) -> Option<(String, String, &[u8])> {
    match ethertype {
        0x0800 if ip.len() >= 20 && ip[9] == 6 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
            let src = std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = std::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            Some((src.to_string(), dst.to_string(), ip.get(ihl..total)?))
        }
        0x86dd if ip.len() >= 40 && ip[6] == 6 => {
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let src = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
            let dst = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
            Some((format!("[{src}]"), format!("[{dst}]"), ip.get(40..40 + len)?))
        }
        _ => None,
    }
}

/// A 32-bit TCP sequence number as a position that keeps growing past the wrap, given
/// the direction's previous one (raw and unwrapped): forward, or back (a retransmission)
/// by less than 2 GiB.
fn unwrap_seq(prev: Option<(u32, u64)>, seq: u32) -> u64 {
    match prev {
        Some((raw, abs)) => abs.wrapping_add_signed(i64::from(seq.wrapping_sub(raw).cast_signed())),
        None => (1u64 << 33) + u64::from(seq),
    }
}

/// Joins segments keyed by unwrapped sequence number.
fn reassemble(segs: &BTreeMap<u64, Vec<u8>>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let Some((&first, _)) = segs.iter().next() else { return Ok(out) };
    let mut next = first;
    for (&seq, bytes) in segs {
        let end = seq + bytes.len() as u64;
        if seq > next {
            return Err(format!("{} bytes missing at sequence {next}", seq - next));
        }
        if end > next {
            out.extend_from_slice(&bytes[(next - seq) as usize..]);
            next = end;
        }
    }
    Ok(out)
}

/// What a stream of TLS records held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TlsStats {
    pub records: u64,
    pub handshake_records: u64,
    /// Bytes inside application-data records (encrypted).
    pub application_bytes: u64,
}

/// Walks `stream` as TLS records (content type, legacy version, length) to its
/// last byte: `Err` names the first offset that is not a record header. A
/// record cut by the end of the capture is allowed (a connection closed mid-write).
pub fn tls_records_only(stream: &[u8]) -> Result<TlsStats, String> {
    let mut st = TlsStats::default();
    let mut at = 0;
    while at < stream.len() {
        let h = stream.get(at..at + 5).ok_or_else(|| format!("a partial record header at byte {at}"))?;
        let (kind, major, len) = (h[0], h[1], usize::from(u16::from_be_bytes([h[3], h[4]])));
        if !(20..=23).contains(&kind) || major != 3 || h[2] > 4 || len > (1 << 14) + 256 {
            let show: Vec<u8> = stream[at..].iter().copied().take(16).collect();
            return Err(format!("byte {at} is not a TLS record header: {}", hex::encode(show)));
        }
        st.records += 1;
        match kind {
            22 => st.handshake_records += 1,
            23 => st.application_bytes += len as u64,
            _ => {}
        }
        at += 5 + len;
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_walked_and_plaintext_is_caught() {
        let mut s = vec![22, 3, 1, 0, 2, 1, 2];
        s.extend([23, 3, 3, 0, 3, 9, 9, 9]);
        let st = tls_records_only(&s).unwrap();
        assert_eq!(st, TlsStats { records: 2, handshake_records: 1, application_bytes: 3 });
        // Slate's plaintext frame header (length, crc) is no record header.
        let mut plain = s.clone();
        plain.extend([0xa6, 0, 0, 0, 0xe4, 0xbd]);
        assert!(tls_records_only(&plain).unwrap_err().contains("byte 15"));
        let mut segs = BTreeMap::new();
        segs.insert(100, vec![1, 2, 3]);
        segs.insert(102, vec![3, 4]); // overlapping retransmission
        segs.insert(104, vec![5]);
        assert_eq!(reassemble(&segs).unwrap(), vec![1, 2, 3, 4, 5]);
        segs.insert(110, vec![6]);
        assert!(reassemble(&segs).is_err(), "a gap is an error");
        // Sequence numbers wrap (a stream starts at a random one).
        let a = unwrap_seq(None, u32::MAX - 9);
        let b = unwrap_seq(Some((u32::MAX - 9, a)), 6);
        assert_eq!(b, a + 16, "past the wrap the position keeps growing");
        assert_eq!(unwrap_seq(Some((6, b)), u32::MAX - 1), a + 8, "a retransmission from before the wrap");
    }
}
