//! The errors that end the program, and the one place that maps them to exit codes.
//! Everything that can go wrong while running (Paheko down, Redis down, a bad entry) is
//! handled where it happens and never reaches here.

use std::fmt;

use crate::config::ConfigError;

#[derive(Debug)]
pub enum Error {
    /// A variable with a value the program cannot use.
    Config(ConfigError),
    /// The command line is not understood.
    Usage(String),
    /// Start-up failed: the health port is taken, a thread could not start…
    Startup(String),
    /// An operator command (`dead …`) failed; it chose the exit code a script can rely
    /// on (see `dead::Failure::code`), and the message is already free of secrets.
    Command { code: u8, message: String },
}

impl Error {
    /// 2 for what the operator must fix in the configuration or command line, 1 for
    /// the rest; 0 is a clean stop.
    pub fn code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            Error::Startup(_) => 1,
            Error::Command { code, .. } => *code,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "configuration: {e}"),
            Error::Usage(e) => write!(f, "usage: {e}"),
            Error::Startup(e) => write!(f, "start-up: {e}"),
            Error::Command { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::Config(e)
    }
}
