//! The shared guest base image: one qcow2 disk plus the kernel and initrd extracted from it
//! for direct kernel boot, built by `debootstrap` from Debian's package archive only.
//!
//! The image is identical for every guest: it holds no host key, no address and no
//! authorized key. A first-boot unit (`ha-seed.service`, run on every boot before the network
//! firewall and sshd) copies the per-guest seed disk (`/dev/vdb`, see
//! [`crate::bootstrap`]) onto `/`: systemd-networkd files with the guest's static addresses,
//! its nftables rules, its pre-generated SSH host key and the provisioner's root key. PostgreSQL (no cluster created) and ejabberd are installed
//! but disabled, so a guest runs only what the pushed units start.
//!
//! Invariants: the build writes into `<out>/.build` and only renames the finished files into
//! place, so an interrupted build never leaves a usable-looking image; `<out>/recipe.sh` holds
//! the exact script that produced the image, so [`BaseImage::open_current`] reuses an image
//! only when the recipe is unchanged.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::info;

use crate::ssh::shell_quote;

/// File names inside an image directory.
const DISK: &str = "base.qcow2";
const KERNEL: &str = "vmlinuz";
const INITRD: &str = "initrd.img";
const RECIPE: &str = "recipe.sh";

/// Packages debootstrap installs with the minimal base: init, kernel, network, sshd.
const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "initramfs-tools",
    "linux-image-amd64",
    "openssh-server",
    "iproute2",
    "nftables",
    "ca-certificates",
];

/// Packages installed afterwards inside the chroot, once PostgreSQL is told not to create its
/// default cluster (the agent creates and drives its own).
const SERVICE_PACKAGES: &[&str] = &["postgresql-15", "ejabberd", "erlang-p1-pgsql"];

/// Kernel command line of every guest: root on the first virtio disk, console on the serial
/// port that the domain writes to a log file.
pub const KERNEL_CMDLINE: &str = "root=/dev/vda rw console=ttyS0 net.ifnames=0";

/// The guest script that applies the seed disk.
const SEED_SCRIPT: &str = r#"#!/bin/sh
# Applies the ha-provision seed disk (/dev/vdb) onto /: addresses, host key, root key.
set -eu
# The kernel's devtmpfs has the disk long before udev announces it: under software emulation
# that announcement can come after systemd's 90 s device timeout, so wait for the node here.
waited=0
while [ ! -b /dev/vdb ]; do
    if [ "$waited" -ge 900 ]; then
        echo "ha-seed: no /dev/vdb after $waited s" >&2
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
mnt=/run/ha-seed
mkdir -p "$mnt"
mount -o ro /dev/vdb "$mnt"
cp -a "$mnt/files/." /
umount "$mnt"
cat /etc/hostname > /proc/sys/kernel/hostname
"#;

/// Its unit: before networkd and sshd. Not bound to `dev-vdb.device`: that job fails when
/// udev is slower than systemd's device timeout (software emulation on a busy host), and the
/// guest would boot without its addresses and host key; the script waits for the disk itself.
const SEED_UNIT: &str = "[Unit]
Description=Apply the ha-provision per-guest seed disk
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target network-pre.target nftables.service systemd-networkd.service ssh.service
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
TimeoutStartSec=20min
ExecStart=/usr/local/sbin/ha-seed

[Install]
WantedBy=sysinit.target
";

/// sshd settings: only the seeded ed25519 host key, root by key only.
const SSHD_CONFIG: &str = "HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
";

/// Errors building or opening an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Filesystem error.
    #[error("image {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The build script failed.
    #[error("image build failed ({status}); its output is above")]
    Build {
        /// Exit status of the script.
        status: std::process::ExitStatus,
    },
    /// A file of the image is missing.
    #[error("{0} is not a built image (run `ha-provision image build --out DIR`)")]
    Missing(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { path, source }
}

/// What to build: the Debian suite, the archive to take it from, and the disk size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecipe {
    /// Debian suite (`bookworm`).
    pub suite: String,
    /// Debian archive URL; the only network source of the build.
    pub mirror: String,
    /// Size of the root filesystem (sparse; the qcow2 holds only what is used).
    pub size_gib: u32,
}

impl Default for ImageRecipe {
    fn default() -> Self {
        Self {
            suite: "bookworm".to_owned(),
            mirror: "http://deb.debian.org/debian".to_owned(),
            size_gib: 4,
        }
    }
}

impl ImageRecipe {
    /// The bash script that builds the image into `out` (run as root).
    pub fn script(&self, out: &Path) -> String {
        let out = shell_quote(&out.display().to_string());
        let mut s = String::from("set -euo pipefail\n");
        let _ = writeln!(s, "out={out}");
        s.push_str(
            r#"work="$out/.build"
root="$work/root"
cleanup() {
  for m in proc sys dev/pts dev; do
    if mountpoint -q "$root/$m" 2>/dev/null; then umount -l "$root/$m"; fi
  done
  rm -rf "$work"
}
trap cleanup EXIT
cleanup
mkdir -p "$root"
"#,
        );
        let _ = writeln!(
            s,
            "debootstrap --variant=minbase --include={} {} \"$root\" {}",
            BASE_PACKAGES.join(","),
            shell_quote(&self.suite),
            shell_quote(&self.mirror)
        );
        s.push_str(
            r#"mkdir -p "$root/etc/postgresql-common"
echo 'create_main_cluster = false' > "$root/etc/postgresql-common/createcluster.conf"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
"#,
        );
        let _ = writeln!(
            s,
            "chroot \"$root\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}",
            SERVICE_PACKAGES.join(" ")
        );
        s.push_str(
            r#"chroot "$root" apt-get clean
umount "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d"
rm -f "$root"/etc/ssh/ssh_host_*
"#,
        );
        for (path, mode, content) in [
            (
                "/etc/ssh/sshd_config.d/ha-provision.conf",
                "0644",
                SSHD_CONFIG,
            ),
            ("/usr/local/sbin/ha-seed", "0755", SEED_SCRIPT),
            ("/etc/systemd/system/ha-seed.service", "0644", SEED_UNIT),
            (
                "/etc/fstab",
                "0644",
                "/dev/vda / ext4 errors=remount-ro 0 1\n",
            ),
            ("/etc/hostname", "0644", "ha-guest\n"),
        ] {
            let _ = writeln!(
                s,
                "mkdir -p \"$root\"{dir}\ncat > \"$root\"{path} <<'HA_EOF'\n{content}HA_EOF\nchmod {mode} \"$root\"{path}",
                dir = shell_quote(
                    &Path::new(path)
                        .parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
                path = shell_quote(path),
            );
        }
        s.push_str(
            r#"chroot "$root" systemctl enable ha-seed.service systemd-networkd.service nftables.service
chroot "$root" systemctl disable postgresql.service ejabberd.service
cp "$root"/boot/vmlinuz-* "$work/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/initrd.img"
chmod 0644 "$work/vmlinuz" "$work/initrd.img"
"#,
        );
        let _ = writeln!(
            s,
            "truncate -s {}G \"$work/root.img\"",
            self.size_gib.max(1)
        );
        s.push_str(
            r#"mkfs.ext4 -q -L ha-root -d "$root" "$work/root.img"
qemu-img convert -f raw -O qcow2 "$work/root.img" "$work/base.qcow2"
chmod 0644 "$work/base.qcow2"
mv "$work/vmlinuz" "$work/initrd.img" "$work/base.qcow2" "$out/"
"#,
        );
        s
    }

    /// Runs [`Self::script`] with bash and records it next to the image.
    pub fn build(&self, out: &Path) -> Result<BaseImage, ImageError> {
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        let script = self.script(out);
        // The recipe is removed first and written last: it marks a finished image.
        let recipe = out.join(RECIPE);
        match std::fs::remove_file(&recipe) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ImageError::Io {
                    path: recipe,
                    source: e,
                });
            }
            _ => {}
        }
        info!(out = %out.display(), suite = %self.suite, mirror = %self.mirror, "building base image");
        let status = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .status()
            .map_err(io_err(Path::new("bash")))?;
        if !status.success() {
            return Err(ImageError::Build { status });
        }
        std::fs::write(&recipe, &script).map_err(io_err(&recipe))?;
        info!(out = %out.display(), "base image built");
        BaseImage::open(out)
    }
}

/// A built image directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    dir: PathBuf,
}

impl BaseImage {
    /// Opens a built image, checking that its files exist.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let dir = std::path::absolute(dir).map_err(io_err(dir))?;
        for f in [DISK, KERNEL, INITRD, RECIPE] {
            if !dir.join(f).is_file() {
                return Err(ImageError::Missing(dir));
            }
        }
        Ok(Self { dir })
    }

    /// Opens `dir` if it holds an image built by exactly `recipe`, builds it otherwise.
    pub fn open_current(dir: &Path, recipe: &ImageRecipe) -> Result<Self, ImageError> {
        let stored = std::fs::read_to_string(dir.join(RECIPE)).ok();
        if stored.as_deref() == Some(recipe.script(dir).as_str())
            && let Ok(image) = Self::open(dir)
        {
            info!(image = %dir.display(), "reusing base image");
            return Ok(image);
        }
        recipe.build(dir)
    }

    /// The qcow2 base disk (backing file of every guest overlay).
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// The kernel for direct boot.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(KERNEL)
    }

    /// The initrd for direct boot.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join(INITRD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_uses_only_the_archive_and_bakes_in_the_services() {
        let r = ImageRecipe::default();
        let s = r.script(Path::new("/var/lib/img dir"));
        assert!(
            s.starts_with("set -euo pipefail\nout='/var/lib/img dir'\n"),
            "{s}"
        );
        assert!(
            s.contains("debootstrap --variant=minbase --include=systemd-sysv,udev,dbus,kmod,initramfs-tools,linux-image-amd64,openssh-server,iproute2,nftables,ca-certificates 'bookworm' \"$root\" 'http://deb.debian.org/debian'"),
            "{s}"
        );
        assert!(
            s.contains("apt-get install -y -q --no-install-recommends postgresql-15 ejabberd erlang-p1-pgsql"),
            "{s}"
        );
        // No cluster and no running service from the packages; no host key in the image.
        let cluster = s.find("create_main_cluster = false").expect("no cluster");
        let install = s.find("postgresql-15 ejabberd").expect("install");
        assert!(
            cluster < install,
            "cluster creation disabled before the install"
        );
        assert!(s.contains("rm -f \"$root\"/etc/ssh/ssh_host_*"), "{s}");
        assert!(s.contains("systemctl disable postgresql.service ejabberd.service"));
        assert!(s.contains(
            "systemctl enable ha-seed.service systemd-networkd.service nftables.service"
        ));
        assert!(
            s.contains("HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password")
        );
        assert!(s.contains("mount -o ro /dev/vdb \"$mnt\"\ncp -a \"$mnt/files/.\" /"));
        assert!(s.contains("Before=sysinit.target network-pre.target nftables.service systemd-networkd.service ssh.service"));
        assert!(s.contains("truncate -s 4G"));
        // Finished files are moved into place last.
        assert!(
            s.trim_end().ends_with(
                "mv \"$work/vmlinuz\" \"$work/initrd.img\" \"$work/base.qcow2\" \"$out/\""
            )
        );
        assert_eq!(
            s.matches("http://").count(),
            1,
            "the archive is the only source"
        );
    }

    #[test]
    fn open_refuses_an_incomplete_directory_and_reuse_needs_the_same_recipe() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            BaseImage::open(dir.path()),
            Err(ImageError::Missing(_))
        ));
        let r = ImageRecipe::default();
        for f in [DISK, KERNEL, INITRD] {
            std::fs::write(dir.path().join(f), b"x").expect("write");
        }
        std::fs::write(dir.path().join(RECIPE), r.script(dir.path())).expect("write");
        let image = BaseImage::open_current(dir.path(), &r).expect("reused without building");
        assert_eq!(image.disk(), dir.path().join(DISK));
        assert_eq!(image.kernel(), dir.path().join(KERNEL));
        assert_eq!(image.initrd(), dir.path().join(INITRD));
    }
}
