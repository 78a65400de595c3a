//! The committed OpenAPI document (`agent/openapi.json`) against the routes
//! that `http.rs` really registers: every `(path, method)` of the router must
//! be documented and every documented operation must exist, so adding a route
//! without docs (or documenting a route that was removed) fails here.

use std::collections::BTreeSet;

use serde_json::Value;

use super::http::OPENAPI;

const ROUTES_SOURCE: &str = include_str!("http.rs");

/// HTTP methods as OpenAPI path-item keys (and axum `MethodRouter` builders).
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Normalizes path parameters so both sides compare equal: axum 0.7 `:id`
/// and catch-all `{*rest}` / `*rest` become `{id}` / `{rest}`.
fn normalize(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if let Some(name) = seg.strip_prefix(':').or_else(|| seg.strip_prefix('*')) {
                format!("{{{name}}}")
            } else if let Some(name) = seg.strip_prefix("{*") {
                format!("{{{name}")
            } else {
                seg.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Rust source reduced to what matters for matching parentheses: comments
/// removed, string and char literals kept as tokens so their content never
/// counts as code.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Str(String),
    Ident(String),
    Punct(char),
}

fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == 'r' && (c.get(i + 1) == Some(&'"') || c.get(i + 1) == Some(&'#')) {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(Tok::Ident("r".into()));
                i += 1;
                continue;
            }
            j += 1;
            let start = j;
            loop {
                assert!(j < c.len(), "unterminated raw string in http.rs");
                if c[j] == '"' && (0..hashes).all(|k| c.get(j + 1 + k) == Some(&'#')) {
                    break;
                }
                j += 1;
            }
            out.push(Tok::Str(c[start..j].iter().collect()));
            i = j + 1 + hashes;
        } else if ch == '"' {
            let mut s = String::new();
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                s.push(c[i]);
                i += 1;
            }
            assert!(i < c.len(), "unterminated string in http.rs");
            out.push(Tok::Str(s));
            i += 1;
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if c.get(i + 1) == Some(&'\\') {
                let mut j = i + 2;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                out.push(Tok::Str(c[i + 1..j].iter().collect()));
                i = j + 1;
            } else if c.get(i + 2) == Some(&'\'') {
                out.push(Tok::Str(c[i + 1].to_string()));
                i += 3;
            } else {
                out.push(Tok::Punct('\''));
                i += 1;
            }
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else {
            if !ch.is_whitespace() {
                out.push(Tok::Punct(ch));
            }
            i += 1;
        }
    }
    out
}

/// Index just past the `)` matching the `(` at `open`.
fn skip_group(toks: &[Tok], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in http.rs");
}

/// The `(path, method)` pairs registered with `.route("PATH", get(..).post(..))`.
fn routes_in_source(src: &str) -> BTreeSet<(String, String)> {
    let toks = lex(src);
    for unsupported in ["nest", "nest_service", "merge", "route_service"] {
        let used = toks
            .windows(3)
            .any(|w| w[0] == Tok::Punct('.') && w[1] == Tok::Ident(unsupported.into()) && w[2] == Tok::Punct('('));
        assert!(!used, "http.rs uses .{unsupported}(...): teach openapi_tests.rs to read it");
    }
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i + 2 < toks.len() {
        let is_route =
            toks[i] == Tok::Punct('.') && toks[i + 1] == Tok::Ident("route".into()) && toks[i + 2] == Tok::Punct('(');
        if !is_route {
            i += 1;
            continue;
        }
        let open = i + 2;
        let end = skip_group(&toks, open) - 1; // the `)` closing `.route(`
        let Tok::Str(path) = &toks[open + 1] else {
            panic!(".route( without a string literal path: {:?}", &toks[open..end])
        };
        assert_eq!(toks[open + 2], Tok::Punct(','), "unexpected token after route path {path}");
        // The method router: `a::b::get(..)` then any number of `.post(..)`.
        let mut j = open + 3;
        let mut methods = Vec::new();
        while j < end {
            let mut name = None;
            while let Tok::Ident(id) = &toks[j] {
                name = Some(id.clone());
                if toks[j + 1] == Tok::Punct(':') && toks[j + 2] == Tok::Punct(':') {
                    j += 3;
                } else {
                    j += 1;
                    break;
                }
            }
            let name = name.unwrap_or_else(|| panic!("route {path}: expected a method builder at {:?}", &toks[j..end]));
            assert_eq!(toks[j], Tok::Punct('('), "route {path}: `{name}` is not called");
            assert!(
                METHODS.contains(&name.as_str()),
                "route {path}: unsupported method router `{name}(..)`; teach openapi_tests.rs to read it"
            );
            methods.push(name);
            j = skip_group(&toks, j);
            match &toks[j] {
                Tok::Punct('.') => j += 1,
                Tok::Punct(',') if j + 1 == end => j += 1,
                _ if j == end => {}
                other => panic!("route {path}: unexpected {other:?} after the method builder"),
            }
        }
        assert!(!methods.is_empty(), "route {path} has no methods");
        for m in methods {
            assert!(out.insert((normalize(path), m.clone())), "route {path} {m} registered twice");
        }
        i = end + 1;
    }
    out
}

fn document() -> Value {
    serde_json::from_str(OPENAPI).unwrap_or_else(|e| panic!("agent/openapi.json is not valid JSON: {e}"))
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("openapi.json has no `paths` object");
    let mut out = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().unwrap_or_else(|| panic!("path item {path} is not an object"));
        for key in item.keys() {
            if METHODS.contains(&key.as_str()) {
                out.insert((normalize(path), key.clone()));
            }
        }
    }
    out
}

#[test]
fn openapi_document_is_openapi_3_0() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi` field missing or not a string");
    assert!(version.starts_with("3.0."), "openapi is {version:?}, expected 3.0.x");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string(), "info.title/version missing");
}

#[test]
fn openapi_parser_reads_chained_routes() {
    let src = r#"
        // .route("/commented", get(x))
        Router::new()
            .route("/a/{id}", get(|s: Ctl, Path(id): Path<String>| run(s, C::Job(format!("{id}(")))).post(b))
            .route(
                "/b/:x",
                axum::routing::delete(f).put(|| async { (')', "/nope") }),
            )
    "#;
    let want: BTreeSet<(String, String)> =
        [("/a/{id}", "get"), ("/a/{id}", "post"), ("/b/{x}", "delete"), ("/b/{x}", "put")]
            .iter()
            .map(|(p, m)| (p.to_string(), m.to_string()))
            .collect();
    assert_eq!(routes_in_source(src), want);
}

#[test]
fn openapi_documents_exactly_the_routes_of_http_rs() {
    let routes = routes_in_source(ROUTES_SOURCE);
    assert!(routes.len() >= 10, "found only {} routes in http.rs: the parser is broken: {routes:?}", routes.len());
    let documented = documented_routes(&document());
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&routes).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "agent/openapi.json and http.rs disagree\n  routes without docs: {undocumented:?}\n  docs without a route: {stale:?}"
    );
}

/// Every `$ref` in `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("$ref", Value::String(s)) => out.push(s),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn openapi_operations_are_complete() {
    let doc = document();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in &all {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("external $ref {r}"));
        assert!(doc.pointer(pointer).is_some(), "$ref {r} points nowhere");
    }
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["required"], serde_json::json!(["error"]), "Error schema must require `error`");
    let inner = &error["properties"]["error"]["required"];
    assert_eq!(inner, &serde_json::json!(["code", "message"]), "error body must require code and message");
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        // Path parameters declared on the item or the operation, against the placeholders.
        let placeholders: BTreeSet<String> = normalize(path)
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')).map(str::to_owned))
            .collect();
        for (method, operation) in item.as_object().into_iter().flatten().filter(|(k, _)| METHODS.contains(&k.as_str()))
        {
            let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(ids.insert(id.to_owned()), "operationId {id} used twice");
            let declared: BTreeSet<String> = item["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(operation["parameters"].as_array().into_iter().flatten())
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect();
            assert_eq!(declared, placeholders, "{method} {path}: path parameters do not match the placeholders");
            let responses =
                operation["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}: no responses"));
            assert!(responses.keys().any(|k| k.starts_with('2')), "{method} {path}: no success response");
            for (code, r) in responses.iter().filter(|(k, _)| k.starts_with('4') || k.starts_with('5')) {
                let target = match r["$ref"].as_str() {
                    Some(p) => doc.pointer(p.trim_start_matches('#')).expect("checked above"),
                    None => r,
                };
                assert_eq!(
                    target["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
                    "{method} {path}: {code} must use the Error body"
                );
            }
        }
    }
    // Bodies the server parses with deny_unknown_fields.
    for schema in [
        "BitmapAdd",
        "MergeBody",
        "BackupJobRequest",
        "MirrorJobRequest",
        "VerifyJobRequest",
        "SpeedBody",
        "CopyModeBody",
        "PrepareMigration",
        "IncomingDisk",
        "CompleteMigration",
    ] {
        let s = &doc["components"]["schemas"][schema];
        assert_eq!(
            s["additionalProperties"],
            Value::Bool(false),
            "schema {schema} must set additionalProperties: false"
        );
    }
    let job = &doc["components"]["schemas"]["JobState"]["enum"];
    assert_eq!(job, &serde_json::json!(["created", "queued", "running", "paused", "ready", "completing", "concluded"]));
    // The states and results the agent serializes are the documented ones.
    use crate::jobs::{JobResult, JobState};
    for state in [
        JobState::Created,
        JobState::Queued,
        JobState::Running,
        JobState::Paused,
        JobState::Ready,
        JobState::Completing,
        JobState::Concluded,
    ] {
        let v = serde_json::to_value(state).expect("state");
        assert!(job.as_array().is_some_and(|a| a.contains(&v)), "state {v} undocumented");
    }
    let results = &doc["components"]["schemas"]["JobResult"]["enum"];
    for result in [JobResult::Success, JobResult::Failed, JobResult::Cancelled] {
        let v = serde_json::to_value(result).expect("result");
        assert!(results.as_array().is_some_and(|a| a.contains(&v)), "result {v} undocumented");
    }
}
