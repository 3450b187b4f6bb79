//! The layer rules of `src/lib.rs`, checked on the source: every `crate::` path in a layer
//! names that layer or one below it, so imports point one way and no circle spans two folders.
//!
//! The order, top to bottom: host, intake, pipeline, redis, telemetry, then the two root
//! leaves (`limits`, `sys`), then `wire` (the `shardgate-proto` crate, which cannot import the
//! server at all: it does not depend on it).

use std::path::{Path, PathBuf};

/// Each layer, and the layers it may import besides itself.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "host",
        &["intake", "pipeline", "redis", "telemetry", "limits", "sys", "wire"],
    ),
    ("intake", &["pipeline", "redis", "telemetry", "limits", "sys", "wire"]),
    ("pipeline", &["redis", "telemetry", "limits", "sys", "wire"]),
    ("redis", &["telemetry", "limits", "sys", "wire"]),
    ("telemetry", &["limits", "sys", "wire"]),
    ("limits", &["wire"]),
    ("sys", &[]),
];

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The `.rs` files of a layer: its folder, or its one file at the root.
fn layer_files(layer: &str) -> Vec<PathBuf> {
    let folder = source_root().join(layer);
    if folder.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "rs"))
            .collect();
        files.sort();
        files
    } else {
        vec![source_root().join(format!("{layer}.rs"))]
    }
}

/// Every layer a file names through `crate::<layer>`, with the line it is on.
fn named_layers(text: &str) -> Vec<(usize, String)> {
    let mut named = Vec::new();
    for (line_index, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '{')
                .collect();
            named.push((line_index + 1, name));
            rest = after;
        }
    }
    named
}

/// No layer imports one above it, nor a module that is in no layer.
#[test]
fn imports_point_down_the_layers() {
    let mut broken = Vec::new();
    for (layer, allowed) in LAYERS {
        let files = layer_files(layer);
        assert!(!files.is_empty(), "layer {layer} has no source");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (line, name) in named_layers(&text) {
                let fine = name == *layer || allowed.contains(&name.as_str());
                if !fine {
                    broken.push(format!("{}:{line}: {layer} names crate::{name}", file.display()));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against the layer order:\n{}",
        broken.join("\n")
    );
}

/// Every source file belongs to a layer (or is lib.rs/main.rs), so none escapes the check above.
#[test]
fn every_source_file_is_in_a_layer() {
    let known: Vec<&str> = LAYERS.iter().map(|(layer, _)| *layer).collect();
    for entry in std::fs::read_dir(source_root()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let is_entry_point = name == "lib" || name == "main";
        assert!(
            is_entry_point || known.contains(&name.as_str()),
            "{} is in no layer of tests/layers.rs",
            path.display()
        );
    }
}

/// The pipeline never names intake's types, nor the command line's `Config`; redis and
/// telemetry never name the `Config` either: each takes settings that `host` builds.
#[test]
fn only_host_sees_the_command_line() {
    for layer in ["intake", "pipeline", "redis", "telemetry"] {
        for file in layer_files(layer) {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                !text.contains("config::Config") && !text.contains("Arc<Config>"),
                "{} names the command line's Config",
                file.display()
            );
        }
    }
}

/// The wire crate depends on nothing of the server: it is the leaf every other crate shares.
#[test]
fn wire_is_a_leaf() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/Cargo.toml");
    let manifest = std::fs::read_to_string(manifest).unwrap();
    assert!(manifest.contains("name = \"shardgate-proto\""));
    assert!(
        !manifest.contains("shardgate ="),
        "shardgate-proto depends on the server"
    );
    assert!(
        !manifest.contains("shardgate-client"),
        "shardgate-proto depends on the client"
    );
}

/// The checker itself: it finds a path, a grouped import, and several paths on one line.
#[test]
fn the_checker_sees_every_form() {
    let text = "use crate::pipeline::shard::Shard;\nuse crate::{host, intake};\nlet x = crate::a::b(crate::c::d);";
    let names: Vec<String> = named_layers(text).into_iter().map(|(_, name)| name).collect();
    assert_eq!(names, ["pipeline", "{host", "a", "c"]);
}
