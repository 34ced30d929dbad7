//! Diff and apply against a naive reference at block boundaries, signatures, the
//! hash-tree exchange, files, progress and resumption.

use std::io::Write;
use std::ops::ControlFlow;

use proptest::prelude::*;

use crate::fuzzing::{check_decode, check_diff_apply, naive_diff, tree_delta};
use crate::*;

fn random(len: usize, seed: u64) -> Vec<u8> {
    lifeboat_source::SplitMix64::new(seed).bytes(len)
}

const BS: u32 = 4096;

fn lengths() -> Vec<usize> {
    let b = BS as usize;
    vec![
        0,
        1,
        b - 1,
        b,
        b + 1,
        2 * b,
        3 * b - 1,
        3 * b,
        5 * b + 17,
        2048 * b + 1,
    ]
}

#[test]
fn every_pairing_matches_the_naive_reference_at_block_boundaries() {
    let bs = BlockSize::new(BS).unwrap();
    for (i, &la) in lengths().iter().enumerate() {
        for (j, &lb) in lengths().iter().enumerate() {
            let a = random(la, i as u64 + 1);
            // Same prefix as `a` with a few edits, so equal blocks occur.
            let mut b = a.clone();
            b.resize(lb, 0);
            if lb > 10 {
                b[lb / 2] ^= 0xFF;
            }
            check_diff_apply(&a, &b, bs).unwrap_or_else(|e| panic!("{la} vs {lb}: {e}"));
            // And unrelated content.
            let c = random(lb, 100 + j as u64);
            check_diff_apply(&a, &c, bs).unwrap_or_else(|e| panic!("{la} vs random {lb}: {e}"));
        }
    }
}

#[test]
fn zero_blocks_are_zero_extents_and_never_sent() {
    let bs = BlockSize::new(BS).unwrap();
    let mut a = random(16 * BS as usize, 3);
    a[4 * BS as usize..8 * BS as usize].fill(0);
    let b = random(16 * BS as usize, 4);
    let d = diff_with(
        &a,
        &b,
        DiffOptions {
            block_size: bs,
            ..DiffOptions::default()
        },
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(d.zero_bytes(), 4 * u64::from(BS));
    assert_eq!(d.data_bytes(), 12 * u64::from(BS));
    assert_eq!(
        d.extents,
        [
            Extent {
                offset: 0,
                len: 4 * 4096,
                kind: ExtentKind::Data
            },
            Extent {
                offset: 4 * 4096,
                len: 4 * 4096,
                kind: ExtentKind::Zero
            },
            Extent {
                offset: 8 * 4096,
                len: 8 * 4096,
                kind: ExtentKind::Data
            },
        ]
    );
    // All-zero pair: nothing differs. All-zero source over data: one zero extent.
    let z = vec![0u8; 10 * BS as usize];
    assert!(diff(&z, &z).unwrap().is_empty());
    let dz = diff(&z, &b).unwrap();
    assert_eq!((dz.zero_bytes(), dz.data_bytes()), (z.len() as u64, 0));
}

#[test]
fn identical_disks_have_an_empty_delta() {
    let a = random(1 << 20, 5);
    let d = diff(&a, &a).unwrap();
    assert!(d.is_empty());
    assert_eq!(d.blocks_compared, 16);
    assert!(d.is_complete());
}

#[test]
fn growing_and_shrinking_are_reported() {
    let a = random(100_000, 6);
    let short = a[..50_000].to_vec();
    let grow = diff(&a, &short).unwrap();
    assert_eq!((grow.source_len, grow.target_len), (100_000, 50_000));
    let mut t = short.clone();
    let stats = apply(&grow, a.as_slice(), &mut t).unwrap();
    assert!(stats.resized);
    assert_eq!(t, a);
    let shrink = diff(&short, &a).unwrap();
    assert_eq!((shrink.source_len, shrink.target_len), (50_000, 100_000));
    assert!(
        !shrink.is_empty(),
        "a shrink is a change even with no extent"
    );
    let mut t = a.clone();
    apply(&shrink, short.as_slice(), &mut t).unwrap();
    assert_eq!(t, short);
}

#[test]
fn files_stream_through_with_the_same_result() {
    let bs = BlockSize::DEFAULT;
    let a = random(20 << 20, 7); // several 8 MiB chunks
    let mut b = a.clone();
    for k in (0..b.len()).step_by(3 << 20) {
        b[k] ^= 1;
    }
    b.truncate(19 << 20);
    let mut fa = tempfile::tempfile().unwrap();
    fa.write_all(&a).unwrap();
    let mut fb = tempfile::tempfile().unwrap();
    fb.write_all(&b).unwrap();

    let from_files = diff(&fa, &fb).unwrap();
    assert_eq!(from_files.extents, naive_diff(&a, &b, bs));
    let sig_b = Signature::compute(&fb, bs).unwrap();
    assert_eq!(diff(&fa, &sig_b).unwrap(), from_files);

    apply(&from_files, &fa, &mut fb).unwrap();
    let mut got = vec![0u8; a.len()];
    ReadAt::read_exact_at(&fb, &mut got, 0).unwrap();
    assert_eq!(ReadAt::size(&fb).unwrap(), a.len() as u64);
    assert_eq!(got, a);
}

/// Sparse files: chunks that are holes on one side, both, or neither (and chunks half
/// hole) diff and hash as their bytes do, whether or not the holes are read.
#[test]
fn sparse_files_diff_and_hash_as_their_bytes() {
    const MIB: usize = 1 << 20;
    let bs = BlockSize::DEFAULT;
    let len = 12 * MIB + 4096; // a last chunk shorter than the others
    // Which MiB of each side hold data (the rest are holes); the last data in both.
    let (a_data, b_data) = ([0, 2, 3, 5, 8, 12], [0, 1, 3, 6, 8, 12]);
    let make = |data: &[usize], seed: u64| {
        let mut bytes = vec![0u8; len];
        let file = tempfile::tempfile().unwrap();
        file.set_len(len as u64).unwrap();
        for &m in data {
            let end = ((m + 1) * MIB).min(len);
            let chunk = random(end - m * MIB, seed + m as u64);
            bytes[m * MIB..end].copy_from_slice(&chunk);
            std::os::unix::fs::FileExt::write_all_at(&file, &chunk, (m * MIB) as u64).unwrap();
        }
        (bytes, file)
    };
    let (a, fa) = make(&a_data, 1);
    let (mut b, fb) = make(&b_data, 1);
    // MiB 8 differs in one block only; MiB 0 and 12 are equal.
    b[8 * MIB + 70_000] ^= 1;
    std::os::unix::fs::FileExt::write_all_at(
        &fb,
        &b[8 * MIB + 70_000..][..1],
        (8 * MIB + 70_000) as u64,
    )
    .unwrap();
    // A hole on one side in the middle of data written as zeros on the other.
    let zeros = vec![0u8; MIB];
    std::os::unix::fs::FileExt::write_all_at(&fa, &zeros, (10 * MIB) as u64).unwrap();
    assert!(
        ReadAt::data_ranges(&fa, 0, len as u64).unwrap().len() > 1,
        "the test needs a file system that reports holes"
    );
    let want = naive_diff(&a, &b, bs);
    assert_eq!(diff(&fa, &fb).unwrap().extents, want);
    assert_eq!(diff(&a, &fb).unwrap().extents, want);
    assert_eq!(diff(&fa, &b).unwrap().extents, want);
    for (bytes, file) in [(&a, &fa), (&b, &fb)] {
        let sig = Signature::compute(file, bs).unwrap();
        assert_eq!(sig, Signature::compute(bytes, bs).unwrap());
        assert_eq!(diff(&a, &sig).unwrap(), diff(&a, bytes).unwrap());
    }
}

#[test]
fn streamed_signature_diff_matches_and_checks_the_trailer() {
    let bs = BlockSize::new(512).unwrap();
    let a = random(40_000, 21);
    let mut b = a.clone();
    b[10_000] ^= 1;
    b.truncate(30_000);
    let sig = Signature::compute(&b, bs).unwrap();
    let bytes = sig.encode();
    let mut r = SignatureReader::new(bytes.as_slice()).unwrap();
    let d = diff_streamed(&a, &mut r, DiffOptions::default(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(d, diff(&a, &sig).unwrap());
    // A target longer than the source is drained, so its trailer is still checked.
    let longer = Signature::compute(&random(60_000, 22), bs).unwrap();
    let mut bad = longer.encode();
    let n = bad.len();
    bad[n - 1] ^= 1;
    let mut r = SignatureReader::new(bad.as_slice()).unwrap();
    assert!(matches!(
        diff_streamed(&a, &mut r, DiffOptions::default(), |_| {
            ControlFlow::Continue(())
        }),
        Err(Error::BadSignature { .. })
    ));
    // A source of another block size is refused.
    let s4k = Signature::compute(&a, BlockSize::new(4096).unwrap()).unwrap();
    let mut r = SignatureReader::new(bytes.as_slice()).unwrap();
    assert!(matches!(
        diff_streamed(&s4k, &mut r, DiffOptions::default(), |_| {
            ControlFlow::Continue(())
        }),
        Err(Error::BlockSizeMismatch { .. })
    ));
}

#[test]
fn progress_reports_a_stop_is_interrupted_and_ranges_join() {
    let a = random(40 << 20, 8);
    let mut b = a.clone();
    b[30 << 20] ^= 1;
    let mut seen = Vec::new();
    let stopped = diff_with(&a, &b, DiffOptions::default(), |p| {
        seen.push(p);
        if p.blocks_done >= 256 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    // 16 chunks of 1 MiB (16 blocks of 64 KiB), then the stop: the same error as a
    // signature's computation stopped.
    assert!(matches!(
        stopped,
        Err(Error::Interrupted { next_block: 256 })
    ));
    let sig = Signature::compute_with_progress(&a, BlockSize::DEFAULT, |_| ControlFlow::Break(()));
    assert!(matches!(sig, Err(Error::Interrupted { next_block: 16 })));
    assert_eq!(seen.len(), 16);
    assert!(
        seen.windows(2)
            .all(|w| w[1].blocks_done == w[0].blocks_done + 16)
    );
    assert_eq!(seen[15].blocks_total, 640);
    // Cut into steps: nothing is lost between them.
    let step = |start_block: u64, end_block: Option<u64>| {
        let options = DiffOptions {
            start_block,
            end_block,
            ..DiffOptions::default()
        };
        diff_with(&a, &b, options, |_| ControlFlow::Continue(())).unwrap()
    };
    let first = step(0, Some(256));
    assert!(!first.is_complete());
    assert_eq!((first.next_block, first.bytes_differing()), (256, 0));
    let rest = step(first.next_block, None);
    assert!(rest.is_complete());
    let mut whole = first.clone();
    whole.append(rest.clone()).unwrap();
    assert_eq!(whole, diff(&a, &b).unwrap());
    // Appending out of order is refused; an end past the source is its end.
    let mut wrong = rest;
    assert!(matches!(wrong.append(first), Err(Error::DeltaMismatch)));
    assert_eq!(step(0, Some(u64::MAX)), diff(&a, &b).unwrap());
}

#[test]
fn signature_encoding_round_trips_and_streams() {
    let mut a = random(300_000, 9);
    a[0..70_000].fill(0);
    let bs = BlockSize::new(8192).unwrap();
    let sig = Signature::compute(&a, bs).unwrap();
    let bytes = sig.encode();
    assert_eq!(&bytes[..4], b"LBSG");
    assert_eq!(Signature::decode(&bytes).unwrap(), sig);
    // Zero blocks cost one byte each.
    let zeros = sig.digests().iter().filter(|d| **d == Digest::Zero).count();
    assert_eq!(zeros, 8);
    assert_eq!(
        bytes.len(),
        20 + zeros + 33 * (sig.digests().len() - zeros) + 32
    );
    // The streamed form is the same bytes.
    let streamed = write_signature(a.as_slice(), bs, Vec::new()).unwrap();
    assert_eq!(streamed, bytes);
    let mut r = SignatureReader::new(streamed.as_slice()).unwrap();
    let mut n = 0;
    while let Some(d) = r.next_digest().unwrap() {
        assert_eq!(d, sig.digests()[n]);
        n += 1;
    }
    assert_eq!(n, sig.digests().len());
}

#[test]
fn corrupt_or_truncated_signatures_are_errors() {
    let sig = Signature::compute(&random(100_000, 10), BlockSize::new(4096).unwrap()).unwrap();
    let bytes = sig.encode();
    for cut in [0, 3, 19, 20, 21, 100, bytes.len() - 1] {
        assert!(
            matches!(
                Signature::decode(&bytes[..cut]),
                Err(Error::BadSignature {
                    reason: "truncated",
                    ..
                })
            ),
            "cut at {cut}"
        );
    }
    for at in 0..bytes.len() {
        let mut b = bytes.clone();
        b[at] ^= 0x40;
        assert!(Signature::decode(&b).is_err(), "flip at {at} accepted");
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        Signature::decode(&long),
        Err(Error::BadSignature {
            reason: "trailing bytes after the trailer",
            ..
        })
    ));
    // A header claiming an enormous disk allocates nothing and fails on the data.
    let mut huge = bytes[..20].to_vec();
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(Signature::decode(&huge).is_err());
}

#[test]
fn block_sizes_are_checked() {
    for bad in [0, 256, 511, 513, 4095, 3 << 10, 1 << 31] {
        assert!(matches!(BlockSize::new(bad), Err(Error::BadBlockSize { found }) if found == bad));
    }
    for good in [512, 4096, 65536, 1 << 30] {
        assert_eq!(BlockSize::new(good).unwrap().get(), good);
    }
    let a = vec![1u8; 10_000];
    let s1 = Signature::compute(&a, BlockSize::new(512).unwrap()).unwrap();
    let s2 = Signature::compute(&a, BlockSize::new(1024).unwrap()).unwrap();
    assert!(matches!(
        diff(&s1, &s2),
        Err(Error::BlockSizeMismatch { .. })
    ));
}

#[test]
fn apply_refuses_a_changed_source() {
    let a = random(10_000, 11);
    let d = diff(&a, &vec![0u8; 5000]).unwrap();
    let mut t = vec![0u8; 5000];
    assert!(matches!(
        apply(&d, &a[..9000], &mut t),
        Err(Error::SourceChanged {
            expected: 10_000,
            found: 9000
        })
    ));
}

#[test]
fn tree_exchange_sends_a_fraction_of_the_flat_signature_for_small_changes() {
    // 32 768 blocks of 512 bytes (a 2 GiB disk at 64 KiB has as many); 0.1 % changed.
    let bs = BlockSize::new(512).unwrap();
    let a = random(32_768 * 512, 12);
    let mut b = a.clone();
    for k in 0..33u64 {
        let at = ((k * 2_654_435_761) % 32_768) * 512;
        b[at as usize] ^= 1;
    }
    let (sa, sb) = (
        Signature::compute(&a, bs).unwrap(),
        Signature::compute(&b, bs).unwrap(),
    );
    let leaves = bs.blocks(a.len() as u64);
    let remote = HashTree::new(&sb, leaves).unwrap();
    let mut sync = TreeSync::new(HashTree::new(&sa, leaves).unwrap());
    while let Some(req) = sync.poll_request() {
        let resp = remote.answer(&req).unwrap();
        sync.handle_response(&resp).unwrap();
    }
    assert_eq!(sync.rounds(), 4); // 32 768 leaves: 512, 8, 1 above them
    assert_eq!(sync.differing_blocks().len(), 33);
    let flat = sb.encode().len() as u64;
    let exchanged = sync.bytes_exchanged();
    eprintln!("tree exchange: {exchanged} bytes vs a flat signature of {flat}");
    assert!(
        exchanged * 10 <= flat,
        "{exchanged} bytes exchanged vs a flat signature of {flat}"
    );
    assert_eq!(
        sync.into_delta(&sa, sb.len()).unwrap(),
        diff(&sa, &sb).unwrap()
    );
}

#[test]
fn tree_exchange_rejects_bad_messages() {
    let bs = BlockSize::new(512).unwrap();
    let s = Signature::compute(&random(5000, 13), bs).unwrap();
    let t = HashTree::new(&s, 10).unwrap();
    assert!(HashTree::new(&s, 5).is_err());
    assert!(
        t.answer(&Request {
            level: 9,
            nodes: vec![0]
        })
        .is_err()
    );
    assert!(
        t.answer(&Request {
            level: 0,
            nodes: vec![10]
        })
        .is_err()
    );
    let mut sync = TreeSync::new(t.clone());
    assert!(sync.handle_response(&Response { digests: vec![] }).is_err());
    let req = sync.poll_request().unwrap();
    assert!(
        sync.handle_response(&Response {
            digests: vec![[0; 32]; req.nodes.len() + 1]
        })
        .is_err()
    );
    // Identical trees: one round trip, nothing differs.
    let mut same = TreeSync::new(t.clone());
    let r = same.poll_request().unwrap();
    same.handle_response(&t.answer(&r).unwrap()).unwrap();
    assert!(same.is_done());
    assert!(same.differing_blocks().is_empty());
    // Empty disks need no exchange at all.
    let empty = Signature::compute(&[][..], bs).unwrap();
    let mut none = TreeSync::new(HashTree::new(&empty, 0).unwrap());
    assert!(none.poll_request().is_none());
    assert_eq!(
        tree_delta(&empty, &empty).unwrap(),
        diff(&empty, &empty).unwrap()
    );
}

#[test]
fn serde_rejects_inconsistent_signatures() {
    // A signature whose digest count does not match its length cannot be built.
    assert!(matches!(
        Signature::from_parts(BlockSize::new(512).unwrap(), 1024, vec![Digest::Zero]),
        Err(Error::BlockCount {
            expected: 2,
            found: 1
        })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn prop_apply_diff_gives_the_source(
        a in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..20_000),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        new_len in proptest::option::of(0usize..20_000),
        shift in 0u32..4,
        zero_run in proptest::option::of((any::<prop::sample::Index>(), 0usize..5000)),
    ) {
        let bs = BlockSize::new(512 << shift).unwrap();
        let mut a = a;
        if let Some((at, n)) = zero_run && !a.is_empty() {
            let s = at.index(a.len());
            let e = (s + n).min(a.len());
            a[s..e].fill(0);
        }
        let mut b = a.clone();
        for (at, v) in edits {
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] = v;
            }
        }
        if let Some(n) = new_len {
            b.resize(n, 0xEE);
        }
        prop_assert_eq!(check_diff_apply(&a, &b, bs), Ok(()));
    }

    /// A block digested in pieces (data, zeros given as data or as a count, in any
    /// split) has the digest of the whole block: zero or not alike.
    #[test]
    fn prop_block_digested_in_pieces_equals_digest_block(
        pieces in proptest::collection::vec(
            (prop_oneof![Just(0u8), any::<u8>()], 0usize..3000, any::<bool>()),
            0..8,
        ),
    ) {
        let mut d = crate::BlockDigester::new();
        let mut whole = Vec::new();
        for &(byte, n, as_count) in &pieces {
            if byte == 0 && as_count {
                d.zeros(n as u64);
            } else {
                d.update(&vec![byte; n]);
            }
            whole.resize(whole.len() + n, byte);
        }
        prop_assert_eq!(d.finish(), crate::digest_block(&whole));
    }

    #[test]
    fn prop_fuzz_split_inputs_hold(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let (a, b, bs) = crate::fuzzing::split(&data);
        prop_assert_eq!(check_diff_apply(&a, &b, bs), Ok(()));
    }

    #[test]
    fn prop_signature_decoding_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert_eq!(check_decode(&data), Ok(()));
        let mut framed = b"LBSG\x01\0\0\0\0\x02\0\0".to_vec();
        framed.extend_from_slice(&data);
        prop_assert_eq!(check_decode(&framed), Ok(()));
    }
}

/// Writes the committed fuzz seeds (run with `--ignored` to refresh them).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus");
    let mut a = random(20_000, 1);
    a[2000..9000].fill(0);
    let sig = Signature::compute(&a, BlockSize::new(1024).unwrap()).unwrap();
    std::fs::write(format!("{dir}/resync_decode/seed-signature"), sig.encode()).unwrap();
    let empty = Signature::compute(&[][..], BlockSize::new(512).unwrap()).unwrap();
    std::fs::write(format!("{dir}/resync_decode/seed-empty"), empty.encode()).unwrap();
    std::fs::write(
        format!("{dir}/resync_diff_apply/seed-mixed"),
        random(120, 2),
    )
    .unwrap();
    let mut zeros = vec![1u8, 128, 3];
    zeros.extend_from_slice(&[0; 40]);
    zeros.extend_from_slice(&random(40, 3));
    std::fs::write(format!("{dir}/resync_diff_apply/seed-zeros"), zeros).unwrap();
}
