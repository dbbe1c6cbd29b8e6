//go:build tools

// Keeps helm's main package (and so everything it imports) in this module's build list, so
// `go mod tidy` records the checksums `go install helm.sh/helm/v3/cmd/helm` needs.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
