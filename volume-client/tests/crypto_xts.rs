//! AES-256-XTS: the batched implementation against IEEE 1619's known answers
//! and against the `xts-mode` reference crate on random data and block indexes,
//! in 4 KiB volume blocks and in the 512-byte sectors of dm-crypt's
//! `aes-xts-plain64` (what a LUKS export is written in).

use aes::cipher::KeyInit;
use aes::Aes256;
use rand::{Rng, RngCore, SeedableRng};
use slate::crypto::{CryptoError, VolumeCipher, XtsKey, DATA_UNIT_BYTES, SECTOR_BYTES};
use xts_mode::{get_tweak_default, Xts128};

/// IEEE 1619-2007 Annex B, vector 10: XTS-AES-256, data unit 0xff, 512 bytes.
const V10_KEY1: &str = "2718281828459045235360287471352662497757247093699959574966967627";
const V10_KEY2: &str = "3141592653589793238462643383279502884197169399375105820974944592";
const V10_CTX: &str = concat!(
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44",
    "680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7d",
    "e8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6",
    "dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b",
    "11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493",
    "c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
);

fn v10_key() -> XtsKey {
    let mut k = hex::decode(V10_KEY1).unwrap();
    k.extend(hex::decode(V10_KEY2).unwrap());
    XtsKey::from_bytes(&k).unwrap()
}

fn reference(key: &XtsKey) -> Xts128<Aes256> {
    let (k1, k2) = key.expose_bytes().split_at(32);
    Xts128::new(Aes256::new_from_slice(k1).unwrap(), Aes256::new_from_slice(k2).unwrap())
}

#[test]
fn ieee1619_vector_10() {
    let key = v10_key();
    let cipher = VolumeCipher::new(&key);
    let plain: Vec<u8> = (0..512u32).map(|i| (i % 256) as u8).collect();
    let mut buf = plain.clone();
    cipher.encrypt_unit(0xff, &mut buf).unwrap();
    assert_eq!(hex::encode(&buf), V10_CTX);
    cipher.decrypt_unit(0xff, &mut buf).unwrap();
    assert_eq!(buf, plain);
    // The reference crate agrees on the same vector.
    let mut r = plain.clone();
    reference(&key).encrypt_sector(&mut r, get_tweak_default(0xff));
    assert_eq!(hex::encode(&r), V10_CTX);
}

#[test]
fn identical_to_xts_mode_on_random_data_and_indexes() {
    let seed: u64 = rand::thread_rng().gen();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..20 {
        let key = XtsKey::generate();
        let ours = VolumeCipher::new(&key);
        let theirs = reference(&key);
        let blocks = rng.gen_range(1..=16usize);
        let first: u64 = match rng.gen_range(0..3) {
            0 => rng.gen_range(0..1000),
            1 => u64::MAX - blocks as u64 + 1,
            _ => rng.gen(),
        };
        let mut plain = vec![0u8; blocks * DATA_UNIT_BYTES];
        rng.fill_bytes(&mut plain);
        let mut a = plain.clone();
        ours.encrypt_blocks(first, &mut a).unwrap();
        let mut b = plain.clone();
        theirs.encrypt_area(&mut b, DATA_UNIT_BYTES, u128::from(first), get_tweak_default);
        assert_eq!(a, b, "ciphertext differs from xts-mode (seed {seed})");
        assert_ne!(a, plain);
        ours.decrypt_blocks(first, &mut a).unwrap();
        assert_eq!(a, plain, "decrypt does not invert encrypt (seed {seed})");
        theirs.decrypt_area(&mut b, DATA_UNIT_BYTES, u128::from(first), get_tweak_default);
        assert_eq!(b, plain);
    }
}

#[test]
fn sectors_are_identical_to_xts_mode_plain64() {
    let seed: u64 = rand::thread_rng().gen();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..20 {
        let key = XtsKey::generate();
        let ours = VolumeCipher::new(&key);
        let theirs = reference(&key);
        let sectors = rng.gen_range(1..=64usize);
        let first: u64 = rng.gen_range(0..1 << 40);
        let mut plain = vec![0u8; sectors * SECTOR_BYTES];
        rng.fill_bytes(&mut plain);
        let mut a = plain.clone();
        ours.encrypt_sectors(first, &mut a).unwrap();
        let mut b = plain.clone();
        theirs.encrypt_area(&mut b, SECTOR_BYTES, u128::from(first), get_tweak_default);
        assert_eq!(a, b, "sector ciphertext differs from xts-mode (seed {seed})");
        ours.decrypt_sectors(first, &mut a).unwrap();
        assert_eq!(a, plain, "decrypt does not invert encrypt (seed {seed})");
    }
    // A 4 KiB block is not eight sectors: the tweak runs per sector.
    let key = XtsKey::generate();
    let c = VolumeCipher::new(&key);
    let mut by_block = vec![0x33u8; DATA_UNIT_BYTES];
    let mut by_sector = by_block.clone();
    c.encrypt_blocks(1, &mut by_block).unwrap();
    c.encrypt_sectors(8, &mut by_sector).unwrap();
    assert_ne!(by_block, by_sector);
    assert!(matches!(c.encrypt_sectors(0, &mut [0u8; 100]), Err(CryptoError::Misaligned { .. })));
}

#[test]
fn same_plaintext_differs_by_block_index_and_key() {
    let key = XtsKey::generate();
    let c = VolumeCipher::new(&key);
    let mut a = vec![0x5au8; DATA_UNIT_BYTES];
    let mut b = a.clone();
    c.encrypt_blocks(7, &mut a).unwrap();
    c.encrypt_blocks(8, &mut b).unwrap();
    assert_ne!(a, b);
    let mut other = vec![0x5au8; DATA_UNIT_BYTES];
    VolumeCipher::new(&XtsKey::generate()).encrypt_blocks(7, &mut other).unwrap();
    assert_ne!(a, other);
}

#[test]
fn keys_are_checked_and_never_printed() {
    assert_eq!(XtsKey::from_bytes(&[0u8; 32]).unwrap_err(), CryptoError::KeyLength(32));
    let mut same = vec![9u8; 32];
    same.extend([9u8; 32]);
    assert_eq!(XtsKey::from_bytes(&same).unwrap_err(), CryptoError::EqualHalves);
    let key = v10_key();
    let shown = format!("{key:?} {:?}", VolumeCipher::new(&key));
    assert!(!shown.contains("27182818"), "key material in Debug output");
    assert!(!shown.to_lowercase().contains(&V10_KEY1[..8]));
    let mut not_whole = vec![0u8; DATA_UNIT_BYTES + 16];
    assert!(matches!(VolumeCipher::new(&key).encrypt_blocks(0, &mut not_whole), Err(CryptoError::Misaligned { .. })));
}
