//! STUB (replaced by the logging branch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}
#[derive(Clone)]
pub struct LogHandle;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct LogError;
impl LogHandle {
    pub fn set_level(&self, _f: &str) -> Result<(), LogError> {
        Ok(())
    }
}
pub fn init(filter: &str, _format: LogFormat) -> LogHandle {
    super::init_logging(filter);
    LogHandle
}
