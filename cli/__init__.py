"""The Click commands: parse, validate, call the library, report. No logic lives here."""
