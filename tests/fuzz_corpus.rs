//! Replays the fuzz corpora (fuzz/corpus/*) through the fuzz targets' code on stable Rust, so
//! `cargo test` checks that no kept input panics. `cargo fuzz` itself needs nightly (see
//! README.md, "Fuzzing").

use std::path::PathBuf;

/// Runs `f` on every file of fuzz/corpus/`target`; returns how many there were.
fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for p in &files {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // Name the input that panicked; the panic message itself is printed above it.
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{target}: input {} panicked", p.display());
    }
    files.len()
}

#[test]
fn store_decode_corpus_never_panics() {
    let n = replay("store_decode", samkv::fuzzing::store_decode);
    assert!(n > 0, "the store_decode corpus is empty");
    // The corpus must reach the accepting path (and its invariants), not only rejections.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/store_decode");
    let valid = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .filter(|b| samkv::store::format::decode(b, None).is_ok())
        .count();
    assert!(
        valid > 0,
        "no input of the store_decode corpus is a valid entry"
    );
}

#[test]
fn request_decode_corpus_never_panics() {
    let n = replay("request_decode", samkv::fuzzing::request_decode);
    assert!(n > 0, "the request_decode corpus is empty");
}

/// Writes shrunken copies of real store entries as store_decode seeds (real entries of even a
/// short document are hundreds of KB). Each keeps its real meta and values but only the first
/// 2 layers and 8 dims per head; the document id does not depend on those, so it is unchanged.
///
///     SAMKV_SEED_ENTRIES=a.safetensors:b.safetensors \
///         cargo test --release --test fuzz_corpus -- --ignored write_store_seeds
#[test]
#[ignore = "writes seed files; run by hand with SAMKV_SEED_ENTRIES"]
fn write_store_seeds() -> samkv::Result<()> {
    use samkv::store::format::{decode, encode};
    use samkv::store::StoredDoc;
    const LAYERS: usize = 2;
    const DIMS: usize = 8;
    let paths = std::env::var("SAMKV_SEED_ENTRIES").expect("set SAMKV_SEED_ENTRIES");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/store_decode");
    for p in std::env::split_paths(&paths) {
        let d = decode(&std::fs::read(&p)?, None)?;
        let (m, hd) = (&d.meta, d.meta.head_dim);
        let shrink = |t: &candle_core::Tensor| -> samkv::Result<candle_core::Tensor> {
            let mut t = t.clone();
            if t.rank() >= 2 && t.dims()[0] == m.n_layers {
                t = t.narrow(0, 0, LAYERS)?;
            }
            if t.dims().last() == Some(&hd) {
                t = t.narrow(t.rank() - 1, 0, DIMS)?;
            }
            Ok(t.contiguous()?)
        };
        let mut meta = m.clone();
        (meta.n_layers, meta.head_dim) = (LAYERS, DIMS);
        let kv = |ts: &[candle_core::Tensor]| -> samkv::Result<Vec<_>> {
            ts[..LAYERS].iter().map(shrink).collect()
        };
        let side = d
            .side
            .iter()
            .map(|(n, t)| Ok((n.clone(), shrink(t)?)))
            .collect::<samkv::Result<_>>()?;
        let small = StoredDoc::new(meta, kv(&d.k)?, kv(&d.v)?, side)?;
        assert_eq!(small.id, d.id);
        let bytes = encode(&small)?;
        let name = format!(
            "seed-{}-{}.safetensors",
            small.meta.dtype,
            &small.id.0[..12]
        );
        std::fs::write(out.join(&name), &bytes)?;
        println!("{name}: {} bytes (from {})", bytes.len(), p.display());
    }
    Ok(())
}
