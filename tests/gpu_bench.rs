//! Pieces of `samkv bench-gpu` that need no model: method specs, the model shapes, and the
//! cache copies that batched decoding runs on. (The whole command is run on the CPU by
//! `bench-gpu --device cpu --shape smollm2-135m`; its numbers only mean something on a GPU.)

use candle_core::{DType, Device, Tensor};
use samkv::bench::gpu::{deep_copy, method_config, shape_config};
use samkv::kv::KvCache;

#[test]
fn method_specs_set_knobs_and_reject_unknown_ones() {
    use samkv::methods::settings::SelectionRule;
    use samkv::methods::MethodSettings;
    let MethodSettings::Cacheblend(c) =
        method_config("cacheblend:ratio=0.3:check_layer=2").unwrap()
    else {
        panic!("not cacheblend")
    };
    assert_eq!((c.ratio, c.check_layer), (0.3, 2));
    assert_eq!(
        method_config("epic:epic_k=4").unwrap(),
        MethodSettings::Epic(samkv::methods::settings::EpicSettings { epic_k: 4 })
    );
    let MethodSettings::Samkv(s) =
        method_config("samkv:selection=global:keep=0.5:no_recompute=true").unwrap()
    else {
        panic!("not samkv")
    };
    assert_eq!(
        (s.selection, s.keep, s.no_recompute),
        (SelectionRule::Global, 0.5, true)
    );
    assert_eq!(method_config("reuse").unwrap(), MethodSettings::Reuse);
    let err = |spec: &str| {
        method_config(spec)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err("reuse:nope=1").contains("no knob `nope`"));
    assert!(err("reuse:ratio").contains("key=value"));
    assert!(err("cacheblend:ratio=abc").contains("cacheblend:ratio=abc"));
}

#[test]
fn llama_shape_has_llama_3_1_8b_parameter_count() {
    let c = shape_config("llama-3.1-8b").unwrap();
    let (h, q, kv) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let layer = h * (q + 2 * kv) + q * h + 3 * h * c.ffn + 2 * h;
    let total = 2 * c.vocab * h + c.n_layers * layer + h;
    // Meta's published count for Llama-3.1-8B (untied embeddings).
    assert_eq!(total, 8_030_261_248);
    let s = c.rope_scaling.unwrap();
    assert_eq!(
        (c.rope_base, s.factor, s.original_max_position_embeddings),
        (500000.0, 8.0, 8192.0)
    );
    assert!(shape_config("smollm2-135m").is_ok());
    assert!(shape_config("gpt-2").is_err());
}

#[test]
fn deep_copies_share_no_storage_with_the_original() {
    let dev = Device::Cpu;
    let mut orig = KvCache::new(2, 2, 4, DType::F32, &dev).unwrap();
    let rows = |n: usize, v: f32| Tensor::full(v, (2, n, 4), &dev).unwrap();
    for layer in &mut orig.layers {
        // Appends leave spare capacity, which a shallow clone would then write into.
        layer
            .append(&rows(3, 1.0), &rows(3, 2.0), &[0, 1, 2])
            .unwrap();
    }
    let mut copy = deep_copy(&orig).unwrap();
    for layer in &mut copy.layers {
        layer.append(&rows(1, 9.0), &rows(1, 9.0), &[3]).unwrap();
    }
    let sum = |t: Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap();
    for (o, c) in orig.layers.iter().zip(&copy.layers) {
        assert_eq!(o.positions(), &[0, 1, 2]);
        assert_eq!(c.positions(), &[0, 1, 2, 3]);
        assert_eq!(sum(o.keys().unwrap()), 24.0);
        assert_eq!(sum(c.keys().unwrap()), 24.0 + 72.0);
        assert_eq!(sum(c.values().unwrap().narrow(1, 0, 3).unwrap()), 48.0);
    }
}

/// The whole command on the CPU at SmolLM2's shape, tiny: the printed tables and the JSON
/// report are rendered from the same rows (one renderer), a spec that does not build is a
/// row saying so, and decoding runs over Recompute's and SamKV's caches.
#[test]
fn tables_and_json_report_come_from_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.json");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_samkv"))
        .args([
            "bench-gpu",
            "--device",
            "cpu",
            "--shape",
            "smollm2-135m",
            "--doc-len",
            "8",
            "--docs",
            "2",
            "--question-len",
            "4",
            "--preamble-len",
            "4",
            "--reps",
            "1",
            "--decode-steps",
            "1",
            "--batch-steps",
            "1",
            "--max-batch",
            "1",
            "--methods",
            "recompute,samkv,bogus",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let methods = report["runs"][0]["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 3);
    for m in &methods[..2] {
        // The table's TTFT cell is the JSON's median, as printed.
        let name = m["name"].as_str().unwrap();
        let ttft = format!("{:.1}", m["ttft_ms_median"].as_f64().unwrap());
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {name} ")))
            .unwrap_or_else(|| panic!("no table row for {name} in\n{stdout}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells[2], ttft, "{line}");
    }
    assert_eq!(methods[2]["available"], false);
    assert!(methods[2]["error"]
        .as_str()
        .unwrap()
        .contains("unknown method"));
    assert!(stdout.contains("| bogus ") && stdout.contains("not available"));
    let decode = report["runs"][0]["decode"].as_array().unwrap();
    let kvs: Vec<&str> = decode.iter().map(|d| d["kv"].as_str().unwrap()).collect();
    assert_eq!(kvs, ["full KV", "SamKV KV"]);
    assert!(decode[0]["batches"][0]["tok_s"].as_f64().unwrap() > 0.0);
}
