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
    let mut segments: BTreeMap<Direction, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
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
        segments.entry(dir).or_default().entry(seq).or_insert_with(|| payload.to_vec());
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

/// Joins segments keyed by sequence number (wrapping is not handled: test
/// captures stay far below 4 GiB per direction).
fn reassemble(segs: &BTreeMap<u32, Vec<u8>>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let Some((&first, _)) = segs.iter().next() else { return Ok(out) };
    let mut next = u64::from(first);
    for (&seq, bytes) in segs {
        let (seq, end) = (u64::from(seq), u64::from(seq) + bytes.len() as u64);
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
    }
}
