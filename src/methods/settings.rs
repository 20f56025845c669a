//! Method settings as one typed value: a serde-tagged enum with each method's own knobs, and
//! the one parser of `name[:key=value...]` specs and JSON overrides that every entry point
//! uses (`samkv bench` specs, `bench-gpu` / `selfcheck` specs, the server's `kv` object).
//!
//! The knobs keep the flat names of [`MethodConfig`] (the command line's flags, which are
//! also where the defaults live), so a spec or a `kv` object reads the same as before, and a
//! record written with every method's knobs (older config.json files) still deserializes:
//! knobs of other methods are ignored there, while a spec or override that names a knob the
//! method does not have is an error. Settings are always complete: each value starts from
//! the flags' knobs for its method, so no struct needs serde defaults.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::cacheblend::Deviation;
use super::config::{MethodConfig, MAX_COUNT, METHOD_NAMES};
use super::samkv::{Attend, SamKvParams, Score, Selection};
use super::{CacheBlend, Epic, Method, MultiInfLlm, Oracle, Recompute, Reuse, SamKv, Update};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum MethodSettings {
    Recompute,
    Reuse,
    Cacheblend(CacheBlendSettings),
    Epic(EpicSettings),
    Infllm(InfLlmSettings),
    Samkv(SamKvSettings),
    /// A diagnostic: SamKV's budget with the blocks Recompute's question attends to most.
    Oracle(SamKvSettings),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheBlendSettings {
    pub ratio: f64,
    pub check_layer: usize,
    pub deviation: Deviation,
    pub gradual: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpicSettings {
    pub epic_k: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InfLlmSettings {
    pub infllm_initial: usize,
    pub infllm_local: usize,
    pub infllm_block: usize,
    pub infllm_topk: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Small,
    Large,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateRule {
    Overwrite,
    Fusion,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FusionRule {
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectionRule {
    PerDoc,
    Global,
    GlobalRelative,
    Coverage,
}

/// SamKV's knobs (see [`MethodConfig`]'s flags for what each does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamKvSettings {
    pub samkv_preset: Preset,
    pub num_initial: Option<usize>,
    pub num_local: Option<usize>,
    pub block_size: Option<usize>,
    pub stable_layers: usize,
    pub update: UpdateRule,
    pub theta: f32,
    pub fusion_rule: FusionRule,
    pub selection: SelectionRule,
    pub keep: f64,
    pub cover: f64,
    pub no_recompute: bool,
    pub samkv_score: Score,
    pub samkv_attend: Attend,
}

impl MethodSettings {
    /// The method's name as specs and the API spell it.
    pub fn name(&self) -> &'static str {
        match self {
            MethodSettings::Recompute => "recompute",
            MethodSettings::Reuse => "reuse",
            MethodSettings::Cacheblend(_) => "cacheblend",
            MethodSettings::Epic(_) => "epic",
            MethodSettings::Infllm(_) => "infllm",
            MethodSettings::Samkv(_) => "samkv",
            MethodSettings::Oracle(_) => "oracle",
        }
    }

    /// The settings of `flags.method` from the command line's flags (which hold every
    /// method's knobs).
    pub fn from_flags(f: &MethodConfig) -> Result<MethodSettings> {
        // Field by field, not through JSON: a NaN flag must reach the range checks as NaN.
        Ok(match f.method.trim() {
            "recompute" => MethodSettings::Recompute,
            "reuse" => MethodSettings::Reuse,
            "cacheblend" => MethodSettings::Cacheblend(CacheBlendSettings {
                ratio: f.ratio,
                check_layer: f.check_layer,
                deviation: word("deviation", &f.deviation)?,
                gradual: f.gradual,
            }),
            "epic" => MethodSettings::Epic(EpicSettings { epic_k: f.epic_k }),
            "infllm" => MethodSettings::Infllm(InfLlmSettings {
                infllm_initial: f.infllm_initial,
                infllm_local: f.infllm_local,
                infllm_block: f.infllm_block,
                infllm_topk: f.infllm_topk,
            }),
            m @ ("samkv" | "oracle") => {
                let s = SamKvSettings {
                    samkv_preset: word("samkv_preset", &f.samkv_preset)?,
                    num_initial: f.num_initial,
                    num_local: f.num_local,
                    block_size: f.block_size,
                    stable_layers: f.stable_layers,
                    update: word("update", &f.update)?,
                    theta: f.theta,
                    fusion_rule: word("fusion_rule", &f.fusion_rule)?,
                    selection: word("selection", &f.selection)?,
                    keep: f.keep,
                    cover: f.cover,
                    no_recompute: f.no_recompute,
                    samkv_score: word("samkv_score", &f.samkv_score)?,
                    samkv_attend: word("samkv_attend", &f.samkv_attend)?,
                };
                if m == "samkv" {
                    MethodSettings::Samkv(s)
                } else {
                    MethodSettings::Oracle(s)
                }
            }
            other => {
                return bad(format!(
                    "unknown method `{other}`; choose one of {}",
                    METHOD_NAMES.join(", ")
                ))
            }
        })
    }

    /// The names of the method's knobs (what an override may set).
    pub fn knob_names(&self) -> Vec<String> {
        match to_json(self) {
            Ok(Value::Object(o)) => o.keys().filter(|k| *k != "method").cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The one override parser: `name` (or, `None`, the flags' own method) with the flags'
    /// knobs for it, then each `(key, value)` over them. A key the method does not have is an
    /// error that lists the ones it has. `value` is JSON; [`Knob::Text`] is text as a spec
    /// gives it (read as JSON where the knob is not a string, e.g. `keep=0.1`).
    pub fn with_overrides(
        flags: &MethodConfig,
        name: Option<&str>,
        overrides: &[(String, Knob)],
    ) -> Result<MethodSettings> {
        let name = name.unwrap_or(&flags.method).trim();
        if !METHOD_NAMES.contains(&name) {
            return bad(format!(
                "unknown method `{name}`; choose one of {}",
                METHOD_NAMES.join(", ")
            ));
        }
        let base = MethodSettings::from_flags(&MethodConfig {
            method: name.to_string(),
            ..flags.clone()
        })?;
        if overrides.is_empty() {
            return Ok(base);
        }
        let Value::Object(mut obj) = to_json(&base)? else {
            return Err(Error::Internal(
                "method settings are not a JSON object".into(),
            ));
        };
        for (key, v) in overrides {
            let key = key.trim().replace('-', "_");
            if key == "method" {
                return bad("the method is given on its own, not as a knob".into());
            }
            let Some(old) = obj.get(&key) else {
                let knobs: Vec<&str> = obj
                    .keys()
                    .map(String::as_str)
                    .filter(|k| *k != "method")
                    .collect();
                return bad(format!(
                    "{name} has no knob `{key}`; {}",
                    if knobs.is_empty() {
                        format!("{name} has no knobs")
                    } else {
                        format!("its knobs: {}", knobs.join(", "))
                    }
                ));
            };
            let value = match v {
                Knob::Json(v) => v.clone(),
                // A string knob keeps the text as given ("1" stays a string); others read JSON.
                Knob::Text(t) => match old {
                    Value::String(_) => Value::String(t.trim().to_string()),
                    _ => serde_json::from_str(t.trim())
                        .unwrap_or_else(|_| Value::String(t.trim().to_string())),
                },
            };
            let same_type = matches!(
                (old, &value),
                (Value::Number(_), Value::Number(_))
                    | (Value::Bool(_), Value::Bool(_))
                    | (Value::String(_), Value::String(_))
                    | (Value::Null, Value::Number(_) | Value::Null)
            );
            if !same_type {
                let want = match old {
                    Value::Bool(_) => "true or false",
                    Value::String(_) => "a string",
                    Value::Null => "a number (or null for the preset's)",
                    _ => "a number",
                };
                return bad(format!("{key} must be {want}, got {value}"));
            }
            obj.insert(key, value);
        }
        from_object(obj).map_err(|e| Error::InvalidInput(format!("{name}: {}", message(e))))
    }

    /// Parses `name[:key=value...]` over the flags' knobs.
    pub fn parse_spec(spec: &str, flags: &MethodConfig) -> Result<MethodSettings> {
        let (name, overrides) = split_spec(spec)?;
        MethodSettings::with_overrides(flags, Some(name), &overrides)
            .map_err(|e| Error::InvalidInput(format!("`{}`: {}", spec.trim(), message(e))))
    }

    /// Builds the method; out-of-range knobs are rejected with the valid range.
    pub fn build(&self) -> Result<Box<dyn Method>> {
        Ok(match self {
            MethodSettings::Recompute => Box::new(Recompute),
            MethodSettings::Reuse => Box::new(Reuse),
            // check_layer is validated against the model's depth when the method assembles.
            MethodSettings::Cacheblend(c) => {
                check_counts(&[("check_layer", Some(c.check_layer))])?;
                Box::new(CacheBlend::new(
                    c.ratio,
                    c.check_layer,
                    c.deviation,
                    c.gradual,
                )?)
            }
            MethodSettings::Epic(e) => {
                check_counts(&[("epic_k", Some(e.epic_k))])?;
                Box::new(Epic { k: e.epic_k })
            }
            MethodSettings::Infllm(i) => Box::new(i.params()?),
            MethodSettings::Samkv(s) => Box::new(SamKv::new(s.params()?)),
            // The oracle always reads the budget globally.
            MethodSettings::Oracle(s) => Box::new(Oracle {
                params: SamKvParams {
                    selection: Selection::Global {
                        keep: s.checked_keep()?,
                        relative: false,
                    },
                    ..s.params()?
                },
            }),
        })
    }
}

/// A knob's value in an override: JSON (the server's `kv`) or text (a spec's `key=value`).
#[derive(Clone, Debug)]
pub enum Knob {
    Json(Value),
    Text(String),
}

/// `name[:key=value...]` into the name and its text overrides.
pub fn split_spec(spec: &str) -> Result<(&str, Vec<(String, Knob)>)> {
    let spec = spec.trim();
    let mut parts = spec.split(':');
    let name = parts.next().unwrap_or_default().trim();
    let mut overrides = Vec::new();
    for part in parts {
        let Some((k, v)) = part.split_once('=') else {
            return bad(format!(
                "`{part}` in `{spec}` is not key=value (e.g. cacheblend:ratio=0.3)"
            ));
        };
        overrides.push((k.trim().to_string(), Knob::Text(v.to_string())));
    }
    Ok((name, overrides))
}

/// A word-valued flag (`selection`, `update`, ...) as its typed value; the error lists the
/// valid words.
fn word<T: serde::de::DeserializeOwned>(knob: &str, v: &str) -> Result<T> {
    serde_json::from_value(Value::String(v.trim().to_string()))
        .map_err(|e| Error::InvalidInput(format!("{knob}: {e}")))
}

fn message(e: Error) -> String {
    match e {
        Error::InvalidInput(m) => m,
        other => other.to_string(),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Internal(format!("method settings: {e}")))
}

fn from_object(obj: Map<String, Value>) -> Result<MethodSettings> {
    serde_json::from_value(Value::Object(obj)).map_err(|e| Error::InvalidInput(e.to_string()))
}

fn bad<T>(msg: String) -> Result<T> {
    Err(Error::InvalidInput(msg))
}

/// Checks count knobs against [`MAX_COUNT`], so that sums and products of them in the
/// methods cannot overflow (a request's `kv` may hold any JSON number).
fn check_counts(counts: &[(&str, Option<usize>)]) -> Result<()> {
    for &(name, v) in counts {
        if let Some(v) = v.filter(|&v| v > MAX_COUNT) {
            return bad(format!(
                "{name} is {v}; counts of tokens, blocks and layers must be at most {MAX_COUNT}"
            ));
        }
    }
    Ok(())
}

impl InfLlmSettings {
    /// The Multi-InfLLM knobs, checked.
    pub fn params(&self) -> Result<MultiInfLlm> {
        check_counts(&[
            ("infllm_initial", Some(self.infllm_initial)),
            ("infllm_local", Some(self.infllm_local)),
            ("infllm_block", Some(self.infllm_block)),
            ("infllm_topk", Some(self.infllm_topk)),
        ])?;
        if self.infllm_block == 0 {
            return bad("infllm_block must be at least 1".into());
        }
        Ok(MultiInfLlm {
            initial: self.infllm_initial,
            local: self.infllm_local,
            block: self.infllm_block,
            topk: self.infllm_topk,
        })
    }
}

impl SamKvSettings {
    /// `(num_initial, num_local, block_size)`: the explicit values, else the preset's.
    pub fn anchors(&self) -> (usize, usize, usize) {
        let (i, l, b) = match self.samkv_preset {
            Preset::Small => (8, 16, 8),
            Preset::Large => (64, 128, 64),
        };
        (
            self.num_initial.unwrap_or(i),
            self.num_local.unwrap_or(l),
            self.block_size.unwrap_or(b),
        )
    }

    /// The SamKV knobs, checked.
    pub fn params(&self) -> Result<SamKvParams> {
        check_counts(&[
            ("num_initial", self.num_initial),
            ("num_local", self.num_local),
            ("block_size", self.block_size),
            ("stable_layers", Some(self.stable_layers)),
        ])?;
        let (num_initial, num_local, block_size) = self.anchors();
        if block_size == 0 {
            return bad("block_size must be at least 1".into());
        }
        if num_local == 0 {
            return bad(
                "num_local must be at least 1: the document query summary pools the last \
                 num_local tokens"
                    .into(),
            );
        }
        if self.stable_layers == 0 {
            return bad("stable_layers must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.theta) {
            return bad(format!("theta must be in [0, 1], got {}", self.theta));
        }
        let update = match (self.update, self.fusion_rule) {
            (UpdateRule::Overwrite, _) => Update::Overwrite,
            (UpdateRule::Fusion, FusionRule::Linear) => Update::Fusion { theta: self.theta },
            (UpdateRule::Fusion, FusionRule::Cosine) => Update::CosineFusion { theta: self.theta },
        };
        let selection = match self.selection {
            SelectionRule::PerDoc => Selection::PerDoc,
            g @ (SelectionRule::Global | SelectionRule::GlobalRelative) => Selection::Global {
                keep: self.checked_keep()?,
                relative: g == SelectionRule::GlobalRelative,
            },
            SelectionRule::Coverage => {
                if !(self.cover > 0.0 && self.cover <= 1.0) {
                    return bad(format!("cover must be in (0, 1], got {}", self.cover));
                }
                if self.samkv_score != Score::Attention {
                    return bad(
                        "selection `coverage` ranks blocks by their share of the question's \
                         attention: add samkv_score=attention"
                            .into(),
                    );
                }
                Selection::Coverage {
                    cover: self.cover,
                    keep: self.checked_keep()?,
                }
            }
        };
        Ok(SamKvParams {
            attend: self.samkv_attend,
            num_initial,
            num_local,
            block_size,
            stable_layers: self.stable_layers,
            update,
            selection,
            recompute: !self.no_recompute,
            score: self.samkv_score,
        })
    }

    /// `keep`, checked: a fraction in (0, 1].
    fn checked_keep(&self) -> Result<f64> {
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return bad(format!("keep must be in (0, 1], got {}", self.keep));
        }
        Ok(self.keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> MethodConfig {
        MethodConfig::default()
    }

    fn spec(s: &str) -> Result<MethodSettings> {
        MethodSettings::parse_spec(s, &flags())
    }

    fn err(s: &str) -> String {
        match spec(s).and_then(|m| m.build().map(|_| m)) {
            Err(e) => e.to_string(),
            Ok(m) => panic!("`{s}` was accepted as {m:?}"),
        }
    }

    #[test]
    fn settings_round_trip_through_json() {
        for s in [
            "recompute",
            "reuse",
            "cacheblend:ratio=0.3:deviation=v:gradual=true",
            "epic:epic_k=4",
            "infllm:infllm_topk=2",
            "samkv:selection=global:keep=0.1:samkv_score=attention:samkv_attend=all",
            "samkv:update=fusion:fusion_rule=cosine:theta=0.5:num_initial=3",
            "oracle:keep=0.2",
        ] {
            let m = spec(s).unwrap();
            let j = serde_json::to_value(&m).unwrap();
            assert_eq!(j["method"], m.name(), "{s}");
            let back: MethodSettings = serde_json::from_value(j).unwrap();
            assert_eq!(back, m, "{s}");
            back.build().unwrap();
        }
        // Only the method's own knobs are written.
        let j = serde_json::to_value(spec("epic").unwrap()).unwrap();
        assert_eq!(j, serde_json::json!({"method": "epic", "epic_k": 16}));
    }

    #[test]
    fn overrides_apply_over_the_flags() {
        let mut f = flags();
        f.keep = 0.4;
        f.ratio = 0.25;
        let m = MethodSettings::with_overrides(
            &f,
            Some("samkv"),
            &[("selection".into(), Knob::Json("global".into()))],
        )
        .unwrap();
        let MethodSettings::Samkv(s) = &m else {
            panic!("{m:?}")
        };
        assert_eq!((s.keep, s.selection), (0.4, SelectionRule::Global));
        assert_eq!(s.anchors(), (8, 16, 8));
        // No name: the flags' method.
        f.method = "cacheblend".into();
        let m = MethodSettings::with_overrides(&f, None, &[]).unwrap();
        assert_eq!(m.name(), "cacheblend");
        let MethodSettings::Cacheblend(c) = m else {
            unreachable!()
        };
        assert_eq!(c.ratio, 0.25);
        // Text values read as JSON except for string knobs; `-` may stand for `_`.
        let MethodSettings::Samkv(s) = spec("samkv:samkv-preset=large:block-size=32").unwrap()
        else {
            unreachable!()
        };
        assert_eq!(s.anchors(), (64, 128, 32));
        // An old record holding every method's knobs still reads.
        let all = serde_json::to_value(MethodConfig::with_method("epic")).unwrap();
        let m: MethodSettings = serde_json::from_value(all).unwrap();
        assert_eq!(m, spec("epic").unwrap());
    }

    #[test]
    fn errors_name_the_knob_and_what_is_valid() {
        assert!(err("nope").contains("unknown method `nope`"));
        assert!(err("reuse:ratio=0.3").contains("reuse has no knobs"));
        let e = err("epic:ratio=0.3");
        assert!(
            e.contains("epic has no knob `ratio`") && e.contains("epic_k"),
            "{e}"
        );
        assert!(err("samkv:keep").contains("not key=value"));
        assert!(err("samkv:method=reuse").contains("given on its own"));
        assert!(err("samkv:block_size=0").contains("block_size"));
        assert!(err("samkv:num_local=0").contains("num_local"));
        assert!(err("samkv:stable_layers=0").contains("stable_layers"));
        assert!(err("samkv:theta=1.5").contains("theta"));
        assert!(err("samkv:selection=global:keep=0").contains("keep"));
        assert!(err("samkv:selection=global:keep=1.01").contains("keep"));
        assert!(err("oracle:keep=0").contains("keep"));
        let e = err("samkv:samkv_preset=medium");
        assert!(e.contains("`small`") && e.contains("`large`"), "{e}");
        let e = err("samkv:selection=local");
        assert!(
            e.contains("`global-relative`") && e.contains("`coverage`"),
            "{e}"
        );
        assert!(err("samkv:selection=coverage").contains("samkv_score=attention"));
        let cov = "samkv:selection=coverage:samkv_score=attention:cover";
        assert!(err(&format!("{cov}=0")).contains("cover must be"));
        assert!(err("samkv:samkv_attend=some").contains("`kept`"));
        assert!(err("samkv:update=blend").contains("`overwrite`"));
        assert!(err("cacheblend:deviation=q").contains("`k`"));
        assert!(err("infllm:infllm_block=0").contains("infllm_block"));
        assert!(err("samkv:keep=abc").contains("keep"));
    }

    #[test]
    fn methods_declare_their_side_data() {
        use crate::methods::SideData;
        let q = |window| SideData::QuerySummary { window };
        assert_eq!(SideData::for_default_methods(), [q(16), q(128)]);
        let side = |s: &str| spec(s).unwrap().build().unwrap().side_data();
        assert_eq!(side("samkv"), [q(16)]);
        assert_eq!(side("samkv:samkv_preset=large"), [q(128)]);
        assert!(side("samkv:samkv_score=attention").is_empty());
        for m in [
            "recompute",
            "reuse",
            "cacheblend",
            "epic",
            "infllm",
            "oracle",
        ] {
            assert!(side(m).is_empty(), "{m}");
        }
    }

    #[test]
    fn huge_counts_are_refused_before_any_arithmetic() {
        for (method, knob) in [
            ("cacheblend", "check_layer"),
            ("epic", "epic_k"),
            ("infllm", "infllm_initial"),
            ("infllm", "infllm_local"),
            ("infllm", "infllm_block"),
            ("infllm", "infllm_topk"),
            ("samkv", "num_initial"),
            ("samkv", "num_local"),
            ("samkv", "block_size"),
            ("samkv", "stable_layers"),
            ("oracle", "block_size"),
        ] {
            for v in [u64::MAX, (MAX_COUNT + 1) as u64] {
                let e = err(&format!("{method}:{knob}={v}"));
                assert!(
                    e.contains(knob) && e.contains("at most"),
                    "{method} {knob}: {e}"
                );
            }
        }
        assert!(spec(&format!("samkv:num_initial={MAX_COUNT}"))
            .unwrap()
            .build()
            .is_ok());
    }
}
