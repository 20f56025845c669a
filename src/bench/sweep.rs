//! Method specs for `samkv bench` (`name[:key=value...]`) and the budget grids of `--sweep`.
//!
//! Specs are parsed by [`MethodSettings::parse_spec`], the one parser of method overrides. A
//! spec's keys are [`MethodConfig`]'s field names (`ratio`, `epic_k`, `infllm_topk`,
//! `num_initial`, `keep`, ...; `-` may stand for `_`). Values are read as JSON where they parse
//! (numbers, booleans) and as strings otherwise, so `cacheblend:ratio=0.3` and
//! `samkv:selection=global:keep=0.1` both work. The spec, trimmed, is the method's label in the
//! results; every knob it does not name comes from the command line's method flags.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::methods::settings::split_spec;
use crate::methods::{Knob, MethodConfig, MethodSettings, METHOD_NAMES};
use crate::{Error, Result};

/// One method setting to benchmark: its label (the spec as given) and its resolved knobs.
#[derive(Clone, Debug)]
pub struct MethodSpec {
    pub label: String,
    pub config: MethodSettings,
}

impl MethodSpec {
    /// The resolved knobs as JSON (what config.json records for the label).
    pub fn config_json(&self) -> Result<Value> {
        serde_json::to_value(&self.config)
            .map_err(|e| Error::Internal(format!("cannot serialize method knobs: {e}")))
    }
}

fn bad<T>(msg: String) -> Result<T> {
    Err(Error::InvalidInput(msg))
}

/// Parses `name[:key=value...]` over `base` (the command line's knobs); the label is the spec
/// with keys spelled as knobs (`check-layer` becomes `check_layer`).
pub fn parse_spec(spec: &str, base: &MethodConfig) -> Result<MethodSpec> {
    let config = MethodSettings::parse_spec(spec, base)?;
    let (name, overrides) = split_spec(spec)?;
    let mut label = name.to_string();
    for (k, v) in &overrides {
        if let Knob::Text(v) = v {
            label.push_str(&format!(":{}={}", k.trim().replace('-', "_"), v.trim()));
        }
    }
    Ok(MethodSpec { label, config })
}

/// The default budget grid of a method, as spec suffixes (`""` is the default setting). Only
/// the budget knob moves: CacheBlend's ratio, EPIC's k, Multi-InfLLM's top-k blocks, SamKV's
/// per-document adaptive selection (both anchor presets, where this build has them) and its
/// global keep fraction.
pub fn default_grid(name: &str) -> &'static [&'static str] {
    match name {
        "cacheblend" => &["ratio=0.05", "ratio=0.15", "ratio=0.3", "ratio=0.5"],
        "epic" => &["epic_k=4", "epic_k=16", "epic_k=32"],
        "infllm" => &[
            "infllm_topk=1",
            "infllm_topk=2",
            "infllm_topk=4",
            "infllm_topk=8",
        ],
        "samkv" => &[
            "",
            "samkv_preset=large",
            "selection=global:keep=0.05",
            "selection=global:keep=0.1",
            "selection=global:keep=0.15",
            "selection=global:keep=0.3",
        ],
        _ => &[""],
    }
}

/// Expands `--grid name:key=v1,v2[:key2=w1,w2]` into specs (the cartesian product).
fn grid_specs(grid: &str) -> Result<(String, Vec<String>)> {
    let mut parts = grid.trim().split(':');
    let name = parts.next().unwrap_or_default().trim().to_string();
    let mut specs = vec![name.clone()];
    for part in parts {
        let Some((k, vs)) = part.split_once('=') else {
            return bad(format!(
                "--grid `{grid}`: `{part}` is not key=v1,v2,... (e.g. cacheblend:ratio=0.1,0.3)"
            ));
        };
        let values: Vec<&str> = vs
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return bad(format!("--grid `{grid}`: `{k}` has no values"));
        }
        specs = specs
            .iter()
            .flat_map(|s| values.iter().map(move |v| format!("{s}:{}={v}", k.trim())))
            .collect();
    }
    Ok((name, specs))
}

/// The method settings of a run: every entry of the comma-separated `methods`; with `sweep`,
/// a bare method name becomes its grid (`grids` replace the default grid of their method).
/// Settings that resolve to the same knobs as an earlier one are dropped.
pub fn expand(
    methods: &str,
    sweep: bool,
    grids: &[String],
    base: &MethodConfig,
) -> Result<Vec<MethodSpec>> {
    let mut custom: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in grids {
        let (name, specs) = grid_specs(g)?;
        for s in &specs {
            parse_spec(s, base)?; // reject unknown methods and knobs up front
        }
        custom.insert(name, specs);
    }
    let mut out: Vec<MethodSpec> = Vec::new();
    let mut seen: Vec<Value> = Vec::new();
    for item in methods.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let specs = if sweep && !item.contains(':') {
            match custom.get(item) {
                Some(s) => s
                    .iter()
                    .map(|s| parse_spec(s, base))
                    .collect::<Result<_>>()?,
                None => grid_defaults(item, base)?,
            }
        } else {
            vec![parse_spec(item, base)?]
        };
        for s in specs {
            let json = s.config_json()?;
            if out.iter().any(|o| o.label == s.label) || seen.contains(&json) {
                tracing::warn!("`{}` repeats an earlier setting; running it once", s.label);
                continue;
            }
            seen.push(json);
            out.push(s);
        }
    }
    if out.is_empty() {
        return bad(format!(
            "--methods names no method; choose from {}",
            METHOD_NAMES.join(", ")
        ));
    }
    Ok(out)
}

/// A method's default grid; settings naming a knob this build lacks are skipped.
fn grid_defaults(name: &str, base: &MethodConfig) -> Result<Vec<MethodSpec>> {
    parse_spec(name, base)?;
    let mut out = Vec::new();
    for suffix in default_grid(name) {
        let spec = if suffix.is_empty() {
            name.to_string()
        } else {
            format!("{name}:{suffix}")
        };
        match parse_spec(&spec, base) {
            Ok(s) => out.push(s),
            Err(e) => tracing::warn!("sweep: skipping `{spec}`: {e}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_sets_knobs_over_the_base() {
        use crate::methods::settings::{CacheBlendSettings, SamKvSettings};
        let base = MethodConfig {
            ratio: 0.2,
            keep: 0.3,
            ..MethodConfig::default()
        };
        let s = parse_spec(" cacheblend:check-layer=2:deviation=v ", &base).unwrap();
        assert_eq!(s.label, "cacheblend:check_layer=2:deviation=v");
        assert_eq!(
            s.config,
            MethodSettings::Cacheblend(CacheBlendSettings {
                ratio: 0.2,
                check_layer: 2,
                deviation: crate::methods::Deviation::V,
                gradual: false,
            }),
            "knobs not named come from the base"
        );
        let s = parse_spec("samkv:selection=global", &base).unwrap();
        let MethodSettings::Samkv(SamKvSettings { keep, .. }) = s.config else {
            panic!("{:?}", s.config)
        };
        assert_eq!(keep, 0.3);
    }

    #[test]
    fn spec_errors_name_the_problem() {
        let base = MethodConfig::default();
        let err = |s: &str| parse_spec(s, &base).unwrap_err().to_string();
        assert!(err("blend").contains("unknown method `blend`"));
        assert!(err("epic:k=3").contains("epic has no knob `k`"));
        assert!(err("epic:epic_k").contains("not key=value"));
        assert!(err("epic:epic_k=lots").contains("epic:epic_k=lots"));
        assert!(err("epic:method=reuse").contains("given on its own"));
    }

    #[test]
    fn expand_sweeps_bare_names_and_dedupes() {
        let base = MethodConfig::default();
        let specs = expand("recompute,epic,epic:epic_k=4,reuse", true, &[], &base).unwrap();
        let labels: Vec<&str> = specs.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "recompute",
                "epic:epic_k=4",
                "epic:epic_k=16",
                "epic:epic_k=32",
                "reuse"
            ]
        );
        let specs = expand(
            "cacheblend",
            true,
            &["cacheblend:ratio=0.1,0.2:check_layer=1,2".into()],
            &base,
        )
        .unwrap();
        assert_eq!(specs.len(), 4);
        assert_eq!(specs[3].label, "cacheblend:ratio=0.2:check_layer=2");
        // Without --sweep a bare name is its default setting.
        assert_eq!(expand("epic", false, &[], &base).unwrap().len(), 1);
        assert!(expand(" , ", false, &[], &base).is_err());
        assert!(expand("epic", true, &["epic:k=1".into()], &base).is_err());
    }
}
