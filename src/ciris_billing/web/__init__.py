"""What the console's and the portal's pages share: templates, style, script, security headers."""
