//! `remora-control-plane --config FILE [--validate]`: a good mesh validates;
//! a bad one makes it exit non-zero listing every problem as
//! `FILE:LINE:COL: field: message`.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use remora_tests::mesh::MeshFile;
use remora_tests::{TestDir, control_plane, workspace};
use serde_yaml_ng::Value;

const CLI_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_mesh_validates() {
    let dir = TestDir::new("cli-good");
    dir.check(
        async {
            let example = workspace::example_mesh();
            let out = control_plane::run(
                &[
                    OsStr::new("--config"),
                    example.as_os_str(),
                    OsStr::new("--validate"),
                ],
                CLI_TIMEOUT,
            )
            .await?;
            ensure!(
                out.status.success(),
                "--validate on {} exited {}: {}",
                example.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            anyhow::Ok(())
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_backends_are_reported_with_their_lines() {
    let dir = TestDir::new("cli-missing-backend");
    dir.check(
        async {
            // Two problems in one file: both must be listed.
            let mut mesh = MeshFile::example()?;
            set_backend(&mut mesh, "v2-path", 0, "service", "no-such-service")?;
            set_backend(&mut mesh, "split", 1, "subset", "v9")?;
            let path = dir.file("missing-backend.yaml");
            mesh.write(&path)?;
            let expected = [
                Expected {
                    field: "services[1].routes[1].backends[0].service",
                    line: line_of(&path, "service: no-such-service")?,
                    mentions: "no-such-service",
                },
                Expected {
                    field: "services[1].routes[2].backends[1].subset",
                    line: line_of(&path, "subset: v9")?,
                    mentions: "v9",
                },
            ];
            check_refused(&path, &expected).await
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_reported_with_their_lines() {
    let dir = TestDir::new("cli-unknown-field");
    dir.check(
        async {
            let mut mesh = MeshFile::example()?;
            mesh.service_mut("catalog.shop")?
                .insert("colour".into(), "blue".into());
            let path = dir.file("unknown-field.yaml");
            mesh.write(&path)?;
            let expected = [Expected {
                field: "services[1]",
                line: line_of(&path, "colour: blue")?,
                mentions: "colour",
            }];
            check_refused(&path, &expected).await
        }
        .await,
    );
}

/// A problem the control plane must report.
struct Expected {
    /// The field path (or its start) named on the line.
    field: &'static str,
    /// 1-based line in the file.
    line: usize,
    /// A word the message must contain.
    mentions: &'static str,
}

/// Runs `--validate` and a plain start on `path`: both must exit non-zero
/// and print, for each expected problem, a line starting `PATH:LINE:` that
/// names the field.
async fn check_refused(path: &Path, expected: &[Expected]) -> Result<()> {
    let config = [OsStr::new("--config"), path.as_os_str()];
    let serve = [
        OsStr::new("--xds-addr"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--monitoring-addr"),
        OsStr::new("127.0.0.1:0"),
    ];
    for (mode, extra) in [
        ("--validate", &[OsStr::new("--validate")][..]),
        ("serving", &serve[..]),
    ] {
        let args: Vec<&OsStr> = config.iter().chain(extra).copied().collect();
        let out = control_plane::run(&args, CLI_TIMEOUT)
            .await
            .with_context(|| format!("{mode}: a bad mesh must make it exit"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "{mode}: exited {} on a bad mesh; stderr:\n{stderr}",
            out.status
        );
        for e in expected {
            let prefix = format!("{}:{}:", path.display(), e.line);
            let found = stderr
                .lines()
                .any(|l| l.contains(&prefix) && l.contains(e.field) && l.contains(e.mentions));
            if !found {
                bail!(
                    "{mode}: stderr has no line with `{prefix}` naming `{}` and `{}`; stderr:\n{stderr}",
                    e.field,
                    e.mentions
                );
            }
        }
    }
    Ok(())
}

/// Sets `field` of backend `index` of catalog's route `route`.
fn set_backend(
    mesh: &mut MeshFile,
    route: &str,
    index: usize,
    field: &str,
    value: &str,
) -> Result<()> {
    let backend = mesh
        .route_mut("catalog.shop", route)?
        .get_mut("backends")
        .and_then(Value::as_sequence_mut)
        .and_then(|b| b.get_mut(index))
        .and_then(Value::as_mapping_mut)
        .with_context(|| format!("route {route} has no backend {index}"))?;
    backend.insert(field.into(), value.into());
    Ok(())
}

/// The 1-based line of the only line of `path` containing `needle`.
fn line_of(path: &Path, needle: &str) -> Result<usize> {
    let text = std::fs::read_to_string(path)?;
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    match lines[..] {
        [line] => Ok(line),
        _ => bail!(
            "{needle:?} is on lines {lines:?} of {}, expected one",
            path.display()
        ),
    }
}
