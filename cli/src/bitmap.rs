//! `quring bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
//! [-f FMT] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g SIZE] FILE BITMAP`: persistent dirty
//! bitmaps with qemu-img's syntax, messages and exit codes, on the library's
//! [`Image::add_bitmap`] and friends. The actions run in command-line order on one open
//! image, as qemu-img runs them; the first that fails ends the command (exit 1), the ones
//! before it stay done.
//!
//! qemu-img parses these options with getopt (actions are repeatable and ordered), so the
//! arguments are taken raw and parsed here.

use crate::probe::ImageFormat;
use clap::Parser;
use quring::image::{Image, Options};
use std::path::PathBuf;

/// Arguments of `quring bitmap` (parsed by [`parse`]).
#[derive(Parser)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// ( --merge SOURCE | --add | --remove | --clear | --enable | --disable )... [-f FMT]
    /// [-b SOURCE_FILE [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] FILENAME BITMAP
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
    args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

#[derive(Default, Debug)]
struct Parsed {
    actions: Vec<Action>,
    format: Option<String>,
    source: Option<PathBuf>,
    source_format: Option<String>,
    granularity: Option<u64>,
    positional: Vec<String>,
    help: bool,
}

const USAGE: &str = "quring bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... \
[-f FMT] [-b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] FILENAME BITMAP";

/// getopt_long's rules: options anywhere (permuted), `--opt=value` or `--opt value`,
/// `-xVALUE` or `-x VALUE`, `--` ends the options.
fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    let mut only_positional = false;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if only_positional || a == "-" || !a.starts_with('-') {
            p.positional.push(a.clone());
            continue;
        }
        if a == "--" {
            only_positional = true;
            continue;
        }
        let (key, inline): (String, Option<String>) = if let Some(long) = a.strip_prefix("--") {
            match long.split_once('=') {
                Some((k, v)) => (format!("--{k}"), Some(v.to_string())),
                None => (a.clone(), None),
            }
        } else {
            let k = a[..2].to_string();
            let rest = &a[2..];
            (k, (!rest.is_empty()).then(|| rest.to_string()))
        };
        let mut value = |name: &str| -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            let v = args.get(i).cloned().ok_or_else(|| format!("option '{name}' requires an argument"))?;
            i += 1;
            Ok(v)
        };
        match key.as_str() {
            "--add" => p.actions.push(Action::Add),
            "--remove" => p.actions.push(Action::Remove),
            "--clear" => p.actions.push(Action::Clear),
            "--enable" => p.actions.push(Action::Enable),
            "--disable" => p.actions.push(Action::Disable),
            "--merge" => {
                let v = value("--merge")?;
                p.actions.push(Action::Merge(v));
            }
            "-f" | "--format" => p.format = Some(value("-f")?),
            "-b" | "--source-file" => p.source = Some(PathBuf::from(value("-b")?)),
            "-F" | "--source-format" => p.source_format = Some(value("-F")?),
            "-g" | "--granularity" => {
                let v = value("-g")?;
                let g = crate::util::parse_size(&v).map_err(|_| format!("Invalid granularity specified: '{v}'."))?;
                p.granularity = Some(g);
            }
            "-h" | "--help" => p.help = true,
            "-q" => {}
            "--image-opts" | "--object" => return Err(format!("option '{key}' is not supported by quring")),
            _ => return Err(format!("unrecognized option '{a}'\nTry 'quring bitmap --help' for more information")),
        }
    }
    Ok(p)
}

pub fn run(Args { args }: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let p = parse(&args)?;
    if p.help {
        println!("Usage:\n  {USAGE}");
        return Ok(0);
    }
    if p.actions.is_empty() {
        return Err("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into());
    }
    let add = p.actions.contains(&Action::Add);
    let merge = p.actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if p.granularity.is_some() && !add {
        return Err("granularity only supported with --add".into());
    }
    if p.source_format.is_some() && p.source.is_none() {
        return Err("-F only supported with -b".into());
    }
    if p.source.is_some() && !merge {
        return Err("Merge bitmap source file only supported with --merge".into());
    }
    let [file, name] = &p.positional[..] else {
        return Err("Expecting filename and bitmap name".into());
    };
    let path = PathBuf::from(file);
    let fmt = crate::probe::resolve(&path, p.format.as_deref(), true)?;
    if fmt == ImageFormat::Raw {
        // A raw image has no bitmaps: qemu-img's refusals.
        let first = &p.actions[0];
        let why = match first {
            Action::Add => format!("Can't store persistent bitmaps to {}: Operation not supported", path.display()),
            Action::Merge(_) | Action::Remove | Action::Clear | Action::Enable | Action::Disable => {
                format!("Dirty bitmap '{name}' not found")
            }
        };
        return Err(format!("Operation {} on bitmap {name} failed: {why}", first.name()).into());
    }
    let img =
        Image::open(&path, &Options::default()).map_err(|e| format!("Could not open '{}': {e}", path.display()))?;
    let src_img = match &p.source {
        Some(src) => {
            let sfmt = crate::probe::resolve(src, p.source_format.as_deref(), false)?;
            if sfmt == ImageFormat::Raw {
                None
            } else {
                let o =
                    Options { read_only: true, backing: quring::image::BackingPolicy::Ignore, ..Default::default() };
                Some(Image::open(src, &o).map_err(|e| format!("Could not open '{}': {e}", src.display()))?)
            }
        }
        None => None,
    };
    let mut result: Result<u8, String> = Ok(0);
    for act in &p.actions {
        let r = match act {
            Action::Add => img.add_bitmap(name, p.granularity, false),
            Action::Remove => img.remove_bitmap(name),
            Action::Clear => img.clear_bitmap(name),
            Action::Enable => img.enable_bitmap(name),
            Action::Disable => img.disable_bitmap(name),
            Action::Merge(src) => {
                if p.source.is_some() && src_img.is_none() {
                    Err(quring::Error::InvalidRequest(format!("Dirty bitmap '{src}' not found")))
                } else {
                    img.merge_bitmap(name, src_img.as_deref(), src)
                }
            }
        };
        if let Err(e) = r {
            result = Err(format!("Operation {} on bitmap {name} failed: {}", act.name(), text(&e)));
            break;
        }
    }
    drop(src_img);
    let closed = img.close().map_err(|e| format!("closing '{}' failed: {e}", path.display()));
    let code = result?;
    closed?;
    Ok(code)
}

/// The message of an engine error as QEMU words it (without quring's category prefix).
fn text(e: &quring::Error) -> String {
    match e {
        quring::Error::InvalidRequest(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn getopt_order_and_values() {
        let p = parse(&v("--disable img b --enable --merge=x -g 64k -bsrc -F qcow2 --merge y")).unwrap();
        assert_eq!(
            p.actions,
            vec![Action::Disable, Action::Enable, Action::Merge("x".into()), Action::Merge("y".into())]
        );
        assert_eq!(p.granularity, Some(65536));
        assert_eq!(p.source, Some(PathBuf::from("src")));
        assert_eq!(p.source_format.as_deref(), Some("qcow2"));
        assert_eq!(p.positional, vec!["img", "b"]);
        assert!(parse(&v("--add -g abc img b")).unwrap_err().contains("Invalid granularity specified: 'abc'."));
        assert!(parse(&v("--frob img b")).is_err());
        assert!(parse(&v("--merge")).is_err());
    }
}
