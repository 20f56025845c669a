// dev-only: prefill/decode timing in wall and process CPU seconds
use samkv::model::*;
use std::time::Instant;
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}
fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let w = match a[2].as_str() { "dense" => WeightMode::Dense, "quantized" => WeightMode::Quantized, _ => WeightMode::Auto };
    let m = Model::load(std::path::Path::new(&a[1]), &LoadOptions { weights: w, ..Default::default() })?;
    let len: usize = a[3].parse()?;
    let dec: usize = a[4].parse()?;
    let reps: usize = a.get(5).map(|s| s.parse().unwrap()).unwrap_or(3);
    let toks: Vec<u32> = (0..len + dec).map(|i| ((i * 7919 + 13) % 30000) as u32).collect();
    let pos: Vec<u32> = (0..(len + dec) as u32).collect();
    { let mut c = m.new_cache()?; m.forward(&toks[..8], &pos[..8], &mut c, Logits::Last, &[])?; }
    let (mut pw, mut pc, mut dw, mut dc) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let mut c = m.new_cache()?;
        let (t, c0) = (Instant::now(), cpu());
        m.forward(&toks[..len], &pos[..len], &mut c, Logits::Last, &[])?;
        pw.push(len as f64 / t.elapsed().as_secs_f64()); pc.push(len as f64 / (cpu() - c0));
        let (t, c0) = (Instant::now(), cpu());
        for i in len..len + dec { m.forward(&toks[i..i + 1], &pos[i..i + 1], &mut c, Logits::Last, &[])?; }
        dw.push(dec as f64 / t.elapsed().as_secs_f64()); dc.push(dec as f64 / (cpu() - c0));
    }
    let med = |v: &mut Vec<f64>| { v.sort_by(f64::total_cmp); v[v.len() - 1] };
    println!("best of {reps}: len {len}: prefill {:.1} tok/s wall, {:.1} tok/cpu-s | decode {:.1} tok/s wall, {:.1} tok/cpu-s", med(&mut pw), med(&mut pc), med(&mut dw), med(&mut dc));
    Ok(())
}
