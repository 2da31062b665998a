//! Project rules as tests (after rust-analyzer's `tidy.rs`): the layer rule,
//! only `api` knows protobuf, no ignored tests, every file says what it is
//! for, the top level stays as decided, the shipped config is the built-in one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for krate in ["hubd", "hubctl", "proto", "tests"] {
        rust_files(&root().join(krate), &mut files);
    }
    assert!(files.len() > 10);
    files
}

/// hubd's layers, as in ARCHITECTURE.md.
const LAYERS: &[(&str, u8)] = &[
    ("model", 0),
    ("config", 0),
    ("acl", 0),
    ("clock", 0),
    ("bus", 0),
    ("store", 1),
    ("ca", 1),
    ("registry", 2),
    ("pairing", 2),
    ("telemetry", 2),
    ("seclog", 2),
    ("edge", 3),
    ("automation", 3),
    ("lifecycle", 3),
    ("wipe", 3),
    ("api", 4),
    ("daemon", 5),
    ("systemd", 5),
];

/// Imports within one layer that are allowed: the ids in `model` are the
/// vocabulary of layer 0, and the composition root uses the service-manager
/// helper, which imports nothing of the crate.
const SAME_LAYER_ALLOWED: &[(&str, &str)] = &[
    ("acl", "model"),
    ("config", "model"),
    ("bus", "model"),
    ("daemon", "systemd"),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The `crate::X` modules a source file names in code (comments may mention
/// any module).
fn crate_imports(source: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let source = code.as_str();
    let mut found = BTreeSet::new();
    for (i, _) in source.match_indices("crate::") {
        let rest = &source[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
        // `use crate::{a, b}` form.
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(0)];
            for part in group.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

#[test]
fn hubd_modules_import_only_lower_layers() {
    let src = root().join("hubd/src");
    // Each top-level module, with the files of its submodules (`edge/*.rs`
    // belongs to `edge`).
    let mut modules: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut files = Vec::new();
            rust_files(&path, &mut files);
            modules.extend(files.into_iter().map(|f| (stem.clone(), f)));
        } else {
            modules.push((stem, path));
        }
    }
    let mut checked = 0;
    for (stem, path) in modules {
        if matches!(stem.as_str(), "lib" | "main") {
            continue;
        }
        let own = layer(&stem).unwrap_or_else(|| {
            panic!("{stem}.rs is not in the layer table (tidy.rs and ARCHITECTURE.md)")
        });
        let source = std::fs::read_to_string(&path).unwrap();
        for import in crate_imports(&source) {
            let Some(theirs) = layer(&import) else {
                continue;
            };
            if import == stem {
                continue;
            }
            let allowed =
                theirs < own || SAME_LAYER_ALLOWED.contains(&(stem.as_str(), import.as_str()));
            assert!(
                allowed,
                "{stem} (layer {own}) imports {import} (layer {theirs}): a module may import only lower layers"
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} modules checked");
}

#[test]
fn automation_never_imports_edge() {
    let path = root().join("hubd/src/automation.rs");
    if let Ok(source) = std::fs::read_to_string(path) {
        assert!(!crate_imports(&source).contains("edge"));
    }
}

#[test]
fn only_api_knows_protobuf() {
    for path in all_rust_files() {
        let rel = path
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // The `api` module: api.rs and its submodules under api/.
        if !rel.starts_with("hubd/src/")
            || rel == "hubd/src/api.rs"
            || rel.starts_with("hubd/src/api/")
        {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        assert!(
            !source.contains("hub_proto") && !source.contains("prost"),
            "{rel} names protobuf types: only the api module (hubd/src/api.rs, api/) may"
        );
    }
}

#[test]
fn no_ignored_tests() {
    let needle = ["#[", "ignore"].concat();
    for path in all_rust_files() {
        let source = std::fs::read_to_string(&path).unwrap();
        assert!(
            !source.contains(&needle),
            "{} ignores a test: fix it or gate it behind an env var the issue names",
            path.display()
        );
    }
}

#[test]
fn every_rust_file_says_what_it_is_for() {
    for path in all_rust_files() {
        let source = std::fs::read_to_string(&path).unwrap();
        let first = source.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        assert!(
            first.starts_with("//!"),
            "{} does not start with a //! doc comment",
            path.display()
        );
    }
}

#[test]
fn the_top_level_stays_as_decided() {
    let allowed: BTreeSet<&str> = [
        "Cargo.toml",
        "Cargo.lock",
        "hubd",
        "hubctl",
        "proto",
        "packaging",
        "config",
        "tests",
        "README.md",
        "SECURITY.md",
        "LICENSE",
        "deny.toml",
        "rustfmt.toml",
        ".ci",
        ".git",
        ".gitignore",
        "target",
    ]
    .into_iter()
    .collect();
    for entry in std::fs::read_dir(root()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            allowed.contains(name.as_str()),
            "unexpected top-level entry {name}"
        );
    }
}

#[test]
fn the_shipped_config_is_the_built_in_default() {
    let shipped = std::fs::read_to_string(root().join("config/hubd.toml")).unwrap();
    assert_eq!(shipped, hubd::Config::DEFAULT_TOML);
    let parsed = hubd::Config::from_toml(&shipped, "config/hubd.toml").unwrap();
    assert_eq!(parsed, hubd::Config::default_config());
}

#[test]
fn readme_opens_with_the_run_and_test_commands_ci_uses() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let opening: Vec<&str> = readme.lines().take(6).collect();
    assert!(
        opening
            .iter()
            .any(|l| l.starts_with("cargo run --release --bin hubd"))
    );
    let test_line = opening
        .iter()
        .find(|l| l.starts_with("cargo test"))
        .expect("README opens with the test command");
    let command = test_line.split('#').next().unwrap().trim();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == command),
        ".ci/run must run `{command}`"
    );
    assert!(ci.contains("cargo fmt --all --check"));
    assert!(ci.contains("cargo clippy --all-targets -- -D warnings"));
}

#[test]
fn every_crate_uses_the_workspace_lints() {
    for krate in ["hubd", "hubctl", "proto", "tests"] {
        let manifest = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("[lints]\nworkspace = true"),
            "{krate}/Cargo.toml does not use [workspace.lints]"
        );
    }
}

#[test]
fn the_readme_rules_example_is_a_valid_rules_file() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("## Automations")
        .nth(1)
        .expect("README has an Automations section");
    let example = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the Automations section has a toml example");
    let rules = hubd::automation::parse_rules(example, "README.md", &|_| true)
        .unwrap_or_else(|e| panic!("the README's rules example is refused:\n{e}"));
    assert!(rules.len() >= 5, "{} rules", rules.len());
}

#[test]
fn every_path_the_deb_metadata_names_exists() {
    let crate_dir = root().join("hubd");
    let manifest: toml::Table = std::fs::read_to_string(crate_dir.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    for key in ["maintainer-scripts", "changelog"] {
        let path = crate_dir.join(deb[key].as_str().unwrap());
        assert!(
            path.exists(),
            "[package.metadata.deb] {key}: {path:?} is missing"
        );
    }
    let assets = deb["assets"].as_array().unwrap();
    let mut checked = 0;
    for asset in assets {
        let source = asset[0].as_str().unwrap();
        // target/release/ is built or generated by packaging/build-deb.sh.
        if source.starts_with("target/release/") {
            continue;
        }
        let path = crate_dir.join(source);
        assert!(path.exists(), "deb asset {source} is missing");
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} deb assets checked");
}
