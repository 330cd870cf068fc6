//! ghz's JSON configuration format, read so that one file drives both ghz and
//! this load generator. The keys are ghz's long flag names. Supported: `call`,
//! `host`, `total`, `concurrency`, `rps`, `duration`, `data`, `metadata`,
//! `insecure` (plain text; otherwise TLS with `cacert`, `cert`, `key` and
//! `cname`), and the load schedules `const`, `step` and `line`, with
//! `load-start`, `load-end`, `load-step`, `load-step-duration` and
//! `load-max-duration`. Others, such as `proto`, are for ghz and are ignored
//! here.
//!
//! Calls: `blockserve.v1.Generation.Generate` (streamed), `GenerateUnary` and
//! `Score`, written `package.Service.Method` or `package.Service/Method`.
//! `data` is the request message in protobuf's JSON mapping. Field names are
//! accepted in snake_case or lowerCamelCase, and `tokenIds` as `{"ids": [...]}`
//! or a plain list.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockserve_proto::v1::{generate_request, score_request, GenerateRequest, GenerationParameters, ScoreRequest, TokenIds};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    pub call: String,
    #[serde(default)]
    pub host: Option<String>,
    /// Requests in all (ghz's default: 200). Ignored when `duration` is set.
    #[serde(default)]
    pub total: Option<usize>,
    /// Workers (ghz's default: 50).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Requests per second (const schedule); none or 0: as fast as workers go.
    #[serde(default)]
    pub rps: Option<f64>,
    /// Run for this long (e.g. "30s", "2m"); `total` is then ignored.
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    #[serde(default)]
    pub insecure: bool,
    /// TLS (when not `insecure`): PEM CA certificates to trust (default: the
    /// system's roots).
    #[serde(default)]
    pub cacert: Option<String>,
    /// TLS: PEM client certificate and key, for servers that require one.
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    /// TLS: the name to check the server's certificate against (default: the host).
    #[serde(default)]
    pub cname: Option<String>,
    #[serde(default)]
    pub load_schedule: Option<String>,
    #[serde(default)]
    pub load_start: Option<f64>,
    #[serde(default)]
    pub load_end: Option<f64>,
    #[serde(default)]
    pub load_step: Option<f64>,
    #[serde(default)]
    pub load_step_duration: Option<String>,
    #[serde(default)]
    pub load_max_duration: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Generate,
    GenerateUnary,
    Score,
}

impl Config {
    pub fn parse(text: &str) -> Result<Self> {
        let c: Config = serde_json::from_str(text).context("not a ghz JSON config")?;
        c.call()?;
        c.schedule()?;
        Ok(c)
    }

    pub fn call(&self) -> Result<Call> {
        let method = self.call.rsplit(['.', '/']).next().unwrap_or("");
        let service = self.call.strip_suffix(method).map(|s| s.trim_end_matches(['.', '/'])).unwrap_or("");
        if service != "blockserve.v1.Generation" {
            bail!("call {:?}: expected blockserve.v1.Generation.<Method>", self.call);
        }
        Ok(match method {
            "Generate" => Call::Generate,
            "GenerateUnary" => Call::GenerateUnary,
            "Score" => Call::Score,
            other => bail!("call {:?}: method {other} is not supported (Generate, GenerateUnary, Score)", self.call),
        })
    }

    pub fn duration(&self) -> Result<Option<Duration>> {
        self.duration.as_deref().map(parse_duration).transpose()
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(50).max(1)
    }

    pub fn total(&self) -> usize {
        self.total.unwrap_or(200)
    }

    pub fn schedule(&self) -> Result<Schedule> {
        let d = |s: &Option<String>| s.as_deref().map(parse_duration).transpose();
        Ok(match self.load_schedule.as_deref().unwrap_or("const") {
            "const" => Schedule::Const(self.rps.filter(|r| *r > 0.0)),
            kind @ ("step" | "line") => {
                let start = self.load_start.ok_or_else(|| anyhow!("load-schedule {kind} needs load-start"))?;
                let step = self.load_step.ok_or_else(|| anyhow!("load-schedule {kind} needs load-step"))?;
                let ramp = Ramp { start, step, end: self.load_end, max: d(&self.load_max_duration)? };
                if kind == "step" {
                    let every = d(&self.load_step_duration)?.ok_or_else(|| anyhow!("load-schedule step needs load-step-duration"))?;
                    Schedule::Step(ramp, every)
                } else {
                    Schedule::Line(ramp)
                }
            }
            other => bail!("load-schedule {other:?}: expected const, step or line"),
        })
    }
}

/// A rising (or falling) rate: from `start`, by `step`, held at `end`.
#[derive(Debug, Clone, Copy)]
pub struct Ramp {
    pub start: f64,
    pub step: f64,
    pub end: Option<f64>,
    /// The schedule stops after this long.
    pub max: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    /// A fixed rate, or none (as fast as the workers go).
    Const(Option<f64>),
    /// start + step every step duration.
    Step(Ramp, Duration),
    /// start + step per second, continuously.
    Line(Ramp),
}

impl Schedule {
    /// Requests per second at `t` into the run (None: unlimited), or Err when
    /// the schedule's maximum duration is over.
    pub fn rate_at(&self, t: Duration) -> std::result::Result<Option<f64>, ()> {
        let clamp = |r: &Ramp, v: f64| {
            let v = match r.end {
                Some(end) if r.step >= 0.0 => v.min(end),
                Some(end) => v.max(end),
                None => v,
            };
            v.max(0.001)
        };
        match self {
            Schedule::Const(r) => Ok(*r),
            Schedule::Step(r, _) | Schedule::Line(r) if r.max.is_some_and(|m| t >= m) => Err(()),
            Schedule::Step(r, every) => Ok(Some(clamp(r, r.start + r.step * (t.as_secs_f64() / every.as_secs_f64()).floor()))),
            Schedule::Line(r) => Ok(Some(clamp(r, r.start + r.step * t.as_secs_f64()))),
        }
    }
}

/// "10s", "1.5s", "500ms", "2m", "1h".
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(|| anyhow!("duration {s:?} has no unit (ms, s, m, h)"))?);
    let n: f64 = num.parse().map_err(|_| anyhow!("duration {s:?}: {num:?} is not a number"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => bail!("duration {s:?}: unit {other:?} is not ms, s, m or h"),
    };
    if !(secs >= 0.0 && secs.is_finite()) {
        bail!("duration {s:?} must be a non-negative time");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A field of a JSON object by its snake_case name or lowerCamelCase alias.
fn field<'a>(v: &'a Value, snake: &str) -> Option<&'a Value> {
    let camel: String = snake.split('_').enumerate().map(|(i, w)| if i == 0 { w.to_string() } else { w[..1].to_uppercase() + &w[1..] }).collect();
    v.get(snake).or_else(|| v.get(&camel))
}

fn ids(v: &Value) -> Result<Vec<u32>> {
    let list = v.get("ids").unwrap_or(v);
    serde_json::from_value(list.clone()).context("token_ids: expected {\"ids\": [u32, ...]} or [u32, ...]")
}

/// `parameters` in protobuf's JSON mapping (lowerCamelCase or snake_case
/// names; 64-bit integers as numbers or strings) as the message. The keys
/// become the message's own field names and serde reads it, so a new field of
/// `GenerationParameters` needs no change here.
fn parameters(v: &Value) -> Result<GenerationParameters> {
    let Some(object) = v.as_object() else { bail!("parameters: expected an object") };
    let snake = |k: &str| {
        k.chars().fold(String::new(), |mut s, c| {
            if c.is_ascii_uppercase() {
                s.push('_');
                s.push(c.to_ascii_lowercase());
            } else {
                s.push(c);
            }
            s
        })
    };
    let fields: serde_json::Map<String, Value> = object
        .iter()
        .map(|(k, v)| {
            // proto3 JSON writes 64-bit integers as strings.
            let v = match v.as_str().and_then(|s| s.parse::<u64>().ok()) {
                Some(n) => Value::from(n),
                None => v.clone(),
            };
            (snake(k), v)
        })
        .collect();
    serde_json::from_value(Value::Object(fields)).context("parameters")
}

/// `data` as a GenerateRequest.
pub fn generate_request(data: &Value) -> Result<GenerateRequest> {
    let prompt = match (field(data, "text"), field(data, "token_ids")) {
        (Some(t), None) => generate_request::Prompt::Text(t.as_str().ok_or_else(|| anyhow!("text: expected a string"))?.to_string()),
        (None, Some(t)) => generate_request::Prompt::TokenIds(TokenIds { ids: ids(t)? }),
        _ => bail!("data: give exactly one of text or token_ids"),
    };
    Ok(GenerateRequest {
        prompt: Some(prompt),
        parameters: field(data, "parameters").map(parameters).transpose()?,
        session_id: field(data, "session_id").and_then(Value::as_str).unwrap_or("").to_string(),
    })
}

/// `data` as a ScoreRequest.
pub fn score_request(data: &Value) -> Result<ScoreRequest> {
    let input = match (field(data, "text"), field(data, "token_ids")) {
        (Some(t), None) => score_request::Input::Text(t.as_str().ok_or_else(|| anyhow!("text: expected a string"))?.to_string()),
        (None, Some(t)) => score_request::Input::TokenIds(TokenIds { ids: ids(t)? }),
        _ => bail!("data: give exactly one of text or token_ids"),
    };
    Ok(ScoreRequest { input: Some(input) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ghz_configs_and_requests() {
        let c = Config::parse(
            r#"{"proto": "x.proto", "call": "blockserve.v1.Generation/Generate", "total": 10, "concurrency": 2,
            "data": {"tokenIds": {"ids": [1, 2, 3]}, "parameters": {"maxNewTokens": 8, "ignore_eos": true, "seed": "7"}}}"#,
        )
        .unwrap();
        assert_eq!(c.call().unwrap(), Call::Generate);
        let r = generate_request(&c.data).unwrap();
        assert_eq!(r.prompt, Some(generate_request::Prompt::TokenIds(TokenIds { ids: vec![1, 2, 3] })));
        let p = r.parameters.unwrap();
        assert_eq!((p.max_new_tokens, p.ignore_eos, p.seed), (Some(8), true, Some(7)));
        assert!(Config::parse(r#"{"call": "blockserve.v1.Generation.Cancel"}"#).unwrap_err().to_string().contains("Cancel"));
        assert!(Config::parse(r#"{"call": "blockserve.v1.Generation.Score", "load-schedule": "step", "load-start": 5}"#)
            .unwrap_err()
            .to_string()
            .contains("load-step"));
    }

    #[test]
    fn schedules_follow_ghz() {
        let c = Config::parse(
            r#"{"call": "blockserve.v1.Generation.Score", "load-schedule": "step", "load-start": 5, "load-step": 5, "load-end": 12,
            "load-step-duration": "2s", "load-max-duration": "10s"}"#,
        )
        .unwrap();
        let s = c.schedule().unwrap();
        let at = |t: f64| s.rate_at(Duration::from_secs_f64(t));
        assert_eq!((at(0.0), at(1.9), at(2.0), at(4.5), at(9.0)), (Ok(Some(5.0)), Ok(Some(5.0)), Ok(Some(10.0)), Ok(Some(12.0)), Ok(Some(12.0))));
        assert_eq!(at(10.0), Err(()));
        let line =
            Config::parse(r#"{"call": "blockserve.v1.Generation.Score", "load-schedule": "line", "load-start": 10, "load-step": -2, "load-end": 4}"#).unwrap();
        let s = line.schedule().unwrap();
        assert_eq!((s.rate_at(Duration::from_secs(1)), s.rate_at(Duration::from_secs(10))), (Ok(Some(8.0)), Ok(Some(4.0))));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5").is_err());
    }
}
