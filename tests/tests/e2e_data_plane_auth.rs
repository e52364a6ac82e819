//! Issue 10, acceptance 2: the data plane authenticates its peer, and a
//! capability works only where and for what it was issued.
//!
//! Against a real `slate up` cluster (TLS on every storage node, node
//! certificates from the cluster CA):
//! - a capability handed to this test (bound to its certificate) opens a
//!   session over TLS as that certificate;
//! - the same capability presented on a TLS session with another certificate
//!   is refused (`NotHolder`), as is plain TCP, and a TLS client that does not
//!   trust the cluster CA refuses the node;
//! - an `AssignSegment` of a segment past the volume's size is refused
//!   (`OutOfRange`) while the volume's own last segment is accepted.

mod e2e_support;

use e2e_support::{data_plane, runtime, segments};
use slate_dataplane::client::NodeClient;
use slate_dataplane::tls::{Connector, Identity};
use slate_protocol::{ErrorKind, Reply, Request, SegmentIndex, SignedCapability, Target, VolumeId};
use slate_tests::cluster::{Cluster, UpOptions};
use std::net::SocketAddr;
use std::time::Duration;

#[test]
fn capabilities_are_bound_to_their_holder_and_scoped_to_the_volume() {
    let cluster = Cluster::start("e2e-dp-auth", UpOptions::default());
    let demo = cluster.volume_show("demo");
    let tenant = demo["tenant"].as_u64().expect("tenant").to_string();
    // A detached volume of two and a half segments, so that a read-write attach here fences nobody.
    let seg_bytes = demo["segment_blocks"].as_u64().unwrap_or(262_144) * 4096;
    let size = 2 * seg_bytes + seg_bytes / 2;
    let v = cluster.slate_json(&["volume", "create", "scoped", "--size", &size.to_string(), "--tenant", &tenant]);
    let vid = v["id"].as_u64().expect("volume id");
    let view = cluster.volume_show("scoped");
    let segs = segments(&view);
    assert_eq!(segs.len(), 3, "2.5 segments make 3");
    let (node, addr) = (segs[2].replicas[0].0, segs[2].replicas[0].1.clone());
    let sa: SocketAddr = addr.parse().expect("node address");

    let token = cluster.info().token_file.clone();
    let body = serde_json::json!({"mode": "read_write", "host": "e2e-dp-auth", "force": false});
    let (status, reply) = cluster.api("POST", &format!("/v1/volumes/{vid}/attach"), Some(&body), &token);
    assert_eq!(status, 200, "attach refused: {}", reply["error"]);
    let aid = reply["attachment"]["id"].as_u64().expect("attachment id");
    let cap = SignedCapability::from_token(reply["capability"]["token"].as_str().expect("token")).expect("capability");
    assert_eq!(cap.claims.holder, cluster.data_plane_identity().holder, "bound to the certificate the test named");
    assert_eq!(cap.claims.segments, 3);
    assert_eq!(cap.claims.size_blocks, size / 4096);
    eprintln!("capability: {:?}", cap.claims);
    let target = Target { volume: VolumeId(vid), generation: cap.claims.generation };
    let segment_blocks = view["segment_blocks"].as_u64().expect("segment_blocks");

    let mine = data_plane(&cluster);
    let stranger = Connector::tls(&cluster.info().ca, &Identity::ephemeral().expect("identity")).expect("connector");
    let untrusting = {
        // A CA the node's certificate does not chain to.
        let dir = cluster.scratch().join("other-ca");
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = another_ca_pem(&dir);
        Connector::tls(&ca, &Identity::ephemeral().expect("identity")).expect("connector")
    };

    runtime().block_on(async {
        // Positive control: the holder's own session.
        let c = NodeClient::connect_with(&mine, sa, cap.clone()).await.expect("the holder's session");
        assert_eq!(c.node().0, node);

        // The same bytes on another certificate's session.
        let e = NodeClient::connect_with(&stranger, sa, cap.clone()).await.expect_err("a copied capability worked");
        assert_eq!(e.kind(), Some(ErrorKind::NotHolder), "{e}");
        eprintln!("copied capability on another TLS session: {e}");

        // Plain TCP: the node speaks TLS only.
        let e = NodeClient::connect(sa, cap.clone()).await.expect_err("plain TCP was served");
        eprintln!("plain TCP: {e}");
        assert!(e.kind().is_none(), "a plaintext hello got as far as a node reply: {e}");

        // A client that does not trust the cluster CA does not talk to the node.
        let e =
            NodeClient::connect_with(&untrusting, sa, cap.clone()).await.expect_err("an untrusted node was accepted");
        assert!(matches!(e, slate_dataplane::client::ClientError::Connect { .. }), "{e}");
        eprintln!("client with another CA: {e}");

        // Scope: the volume's last segment is assignable, the next one is not.
        let assign = |i: u32| Request::AssignSegment { target, segment: SegmentIndex(i), segment_blocks };
        match c.request(assign(2)).await {
            Ok(Reply::Done) => {}
            other => panic!("assigning the volume's own segment 2: {other:?}"),
        }
        for beyond in [3, 4096] {
            let e = c.request(assign(beyond)).await.expect_err("a segment past the volume was assigned");
            assert_eq!(e.kind(), Some(ErrorKind::OutOfRange), "{e}");
            eprintln!("AssignSegment {beyond}: {e}");
        }
        let e = c
            .request(Request::AssignSegment { target, segment: SegmentIndex(1), segment_blocks: segment_blocks * 4 })
            .await
            .expect_err("a segment reaching past the volume was assigned");
        assert_eq!(e.kind(), Some(ErrorKind::OutOfRange), "{e}");
    });

    let body = serde_json::json!({"attachment": aid});
    let (status, reply) = cluster.api("POST", &format!("/v1/volumes/{vid}/detach"), Some(&body), &token);
    assert_eq!(status, 200, "detach refused: {}", reply["error"]);

    // Acceptance 7: the refusals above are security events, reported by the node to slate-meta:
    // a metric by kind and source, and an audit record with the source address.
    for kind in ["capability-key-mismatch", "data-plane-tls-refused"] {
        let r = cluster.wait_for_security_event(&format!("security.{kind}"), "127.0.0.1", Duration::from_mins(1));
        eprintln!("audit: {r}");
        assert!(r["object"].as_str().is_some_and(|o| o.starts_with("count:")), "{r}");
        let n = cluster
            .meta_metric_sum(&format!("slate_meta_security_events_total{{kind=\"{kind}\",source=\"127.0.0.1\"}}"));
        assert!(n >= 1.0, "slate_meta_security_events_total for {kind} is {n}");
    }
}

/// Writes a self-signed CA certificate made by `openssl` into `dir`; returns its path.
fn another_ca_pem(dir: &std::path::Path) -> std::path::PathBuf {
    let cert = dir.join("ca.pem");
    let st = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=another CA", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(st.status.success(), "openssl: {}", String::from_utf8_lossy(&st.stderr));
    cert
}
