//! Attaching programs to interfaces so that attachments outlive the process.
//!
//! * Kernel >= 6.6: TCX links, pinned at `<pin root>/links/<attachment>-<ifname>`. A later
//!   attach with the same pin atomically swaps the program inside the existing link.
//! * Older kernels: a `clsact` qdisc and a direct-action `cls_bpf` filter at a fixed priority and
//!   handle ([`CLSACT_PRIORITY`], [`CLSACT_HANDLE`]); a later attach replaces that filter.

use std::{io, path::PathBuf};

use aya::{
    programs::{
        LinkOrder, ProgramError, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};

use crate::load::{Datapath, LoadError, Program};

/// `tc filter` priority of nodeseal's filters on pre-TCX kernels.
pub const CLSACT_PRIORITY: u16 = 1;
/// `tc filter` handle of nodeseal's filters on pre-TCX kernels ("NS").
pub const CLSACT_HANDLE: u16 = 0x4e53;

/// Errors attaching or detaching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The program is not loaded.
    #[error("program for {attachment:?}")]
    Program {
        /// What was being attached.
        attachment: Attachment,
        /// Cause.
        #[source]
        source: LoadError,
    },
    /// The kernel refused the attachment.
    #[error("attaching {attachment:?} to {ifname}")]
    Attach {
        /// What was being attached.
        attachment: Attachment,
        /// Interface.
        ifname: String,
        /// Cause.
        #[source]
        source: ProgramError,
    },
    /// Creating or removing a pin failed.
    #[error("pin {path}")]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Adding the clsact qdisc failed.
    #[error("adding clsact qdisc to {ifname}")]
    Qdisc {
        /// Interface.
        ifname: String,
        /// Cause.
        #[source]
        source: tc::TcError,
    },
}

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Attachment {
    /// `from_pod` at tc ingress of the host side of a pod veth.
    FromPod,
    /// `to_pod` at tc egress of the host side of a pod veth.
    ToPod,
    /// `from_network` at tc ingress of the node's uplink.
    FromNetwork,
}

impl Attachment {
    const fn program(self) -> Program {
        match self {
            Self::FromPod => Program::FromPod,
            Self::ToPod => Program::ToPod,
            Self::FromNetwork => Program::FromNetwork,
        }
    }

    const fn attach_type(self) -> TcAttachType {
        match self {
            Self::FromPod | Self::FromNetwork => TcAttachType::Ingress,
            Self::ToPod => TcAttachType::Egress,
        }
    }

    const fn slug(self) -> &'static str {
        match self {
            Self::FromPod => "from_pod",
            Self::ToPod => "to_pod",
            Self::FromNetwork => "from_network",
        }
    }
}

/// Whether this kernel attaches with TCX (>= 6.6).
#[must_use]
pub fn uses_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

impl Datapath {
    /// Attaches `attachment` to `ifname`, replacing our earlier attachment there (also one made
    /// by a previous process) atomically. The attachment stays after this `Datapath` is dropped.
    ///
    /// `tc` equivalent (pre-6.6): `tc qdisc add dev IF clsact; tc filter replace dev IF ingress
    /// prio 1 handle 0x4e53 bpf da obj …`.
    ///
    /// # Errors
    ///
    /// [`AttachError`] naming the step that failed.
    pub fn attach(&mut self, attachment: Attachment, ifname: &str) -> Result<(), AttachError> {
        if uses_tcx() {
            self.attach_tcx(attachment, ifname)
        } else {
            self.attach_clsact(attachment, ifname)
        }
    }

    /// Removes our attachment of `attachment` from `ifname`, if there is one.
    ///
    /// # Errors
    ///
    /// [`AttachError`] if the kernel refuses.
    pub fn detach(&mut self, attachment: Attachment, ifname: &str) -> Result<(), AttachError> {
        if uses_tcx() {
            let pin = self.link_pin(attachment, ifname);
            // The link dies with its last reference: the pin (ours were closed after attach).
            return match std::fs::remove_file(&pin) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(AttachError::Pin { path: pin, source }),
            };
        }
        let link = SchedClassifierLink::attached(
            ifname,
            attachment.attach_type(),
            CLSACT_PRIORITY,
            TcHandle::new(0, CLSACT_HANDLE),
            None,
        )
        .map_err(|source| attach_err(attachment, ifname, ProgramError::IOError(source)))?;
        use aya::programs::links::Link as _;
        link.detach()
            .map_err(|source| attach_err(attachment, ifname, source))
    }

    fn link_pin(&self, attachment: Attachment, ifname: &str) -> PathBuf {
        self.pin_root
            .join("links")
            .join(format!("{}-{ifname}", attachment.slug()))
    }

    fn attach_tcx(&mut self, attachment: Attachment, ifname: &str) -> Result<(), AttachError> {
        let pin = self.link_pin(attachment, ifname);
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir).map_err(|source| AttachError::Pin {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let prog = self
            .program_mut(attachment.program())
            .map_err(|source| AttachError::Program { attachment, source })?;
        if let Ok(pinned) = PinnedLink::from_pin(&pin) {
            let replaced = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| ProgramError::IOError(io::Error::other(e)))
                .and_then(|link| prog.attach_to_link(link))
                .and_then(|id| prog.take_link(id));
            match replaced {
                // Dropping our handle closes our fd; the pin keeps the link alive.
                Ok(_link) => return Ok(()),
                Err(error) => {
                    // A link whose interface went away (pod recreated under the same name).
                    tracing::warn!(ifname, %error, pin = %pin.display(), "replacing stale link");
                    std::fs::remove_file(&pin).map_err(|source| AttachError::Pin {
                        path: pin.clone(),
                        source,
                    })?;
                }
            }
        }
        let id = prog
            .attach_with_options(
                ifname,
                attachment.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| attach_err(attachment, ifname, source))?;
        let link = prog
            .take_link(id)
            .map_err(|source| attach_err(attachment, ifname, source))?;
        let fd_link = FdLink::try_from(link).map_err(|e| {
            attach_err(
                attachment,
                ifname,
                ProgramError::IOError(io::Error::other(e)),
            )
        })?;
        fd_link.pin(&pin).map_err(|e| AttachError::Pin {
            path: pin.clone(),
            source: io::Error::other(e),
        })?;
        tracing::info!(ifname, attachment = attachment.slug(), "attached (tcx)");
        Ok(())
    }

    fn attach_clsact(&mut self, attachment: Attachment, ifname: &str) -> Result<(), AttachError> {
        if let Err(source) = tc::qdisc_add_clsact(ifname) {
            // EEXIST: the qdisc is there already (ours or someone's): fine.
            let exists = matches!(&source, tc::TcError::NetlinkError(e)
                if e.raw_os_error() == Some(libc_eexist()));
            if !exists {
                return Err(AttachError::Qdisc {
                    ifname: ifname.to_owned(),
                    source,
                });
            }
        }
        let prog = self
            .program_mut(attachment.program())
            .map_err(|source| AttachError::Program { attachment, source })?;
        let handle = TcHandle::new(0, CLSACT_HANDLE);
        // Replace our existing filter if there is one, otherwise create it.
        let existing = SchedClassifierLink::attached(
            ifname,
            attachment.attach_type(),
            CLSACT_PRIORITY,
            handle,
            None,
        )
        .map_err(ProgramError::IOError)
        .and_then(|link| prog.attach_to_link(link));
        let id = match existing {
            Ok(id) => id,
            Err(_) => prog
                .attach_with_options(
                    ifname,
                    attachment.attach_type(),
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLSACT_PRIORITY,
                        handle,
                        ..NlOptions::default()
                    }),
                )
                .map_err(|source| attach_err(attachment, ifname, source))?,
        };
        let link = prog
            .take_link(id)
            .map_err(|source| attach_err(attachment, ifname, source))?;
        // The filter must outlive this process; dropping the link would delete it.
        std::mem::forget(link);
        tracing::info!(ifname, attachment = attachment.slug(), "attached (clsact)");
        Ok(())
    }
}

const fn libc_eexist() -> i32 {
    17
}

fn attach_err(attachment: Attachment, ifname: &str, source: ProgramError) -> AttachError {
    AttachError::Attach {
        attachment,
        ifname: ifname.to_owned(),
        source,
    }
}
