// Command gitops-health evaluates Backfill objects with the code GitOps tools really run:
// Flux's kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute) and Argo CD's Lua runtime
// (github.com/yuin/gopher-lua, the interpreter Argo CD runs resource health checks in, with the
// object given as the global `obj` as Argo CD does).
//
// Input: a JSON array of objects on stdin. Output: a JSON array of {"kstatus", "kstatusMessage",
// "argo", "argoMessage"}, one per object, on stdout. Usage: go run . LUA-SCRIPT < objects.json
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sjson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Kstatus        string `json:"kstatus"`
	KstatusMessage string `json:"kstatusMessage"`
	Argo           string `json:"argo"`
	ArgoMessage    string `json:"argoMessage"`
}

// toLua converts decoded JSON into Lua values the way Argo CD's lua.go does (maps -> tables,
// arrays -> 1-based tables, numbers -> LNumber).
func toLua(L *lua.LState, v interface{}) lua.LValue {
	switch x := v.(type) {
	case map[string]interface{}:
		t := L.NewTable()
		for k, item := range x {
			t.RawSetString(k, toLua(L, item))
		}
		return t
	case []interface{}:
		t := L.NewTable()
		for _, item := range x {
			t.Append(toLua(L, item))
		}
		return t
	case string:
		return lua.LString(x)
	case bool:
		return lua.LBool(x)
	case float64:
		return lua.LNumber(x)
	case int64:
		return lua.LNumber(x)
	case nil:
		return lua.LNil
	}
	panic(fmt.Sprintf("unexpected JSON value %T", v))
}

func argoHealth(script string, obj map[string]interface{}) (string, string, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: false})
	defer L.Close()
	L.SetGlobal("obj", toLua(L, obj))
	if err := L.DoString(script); err != nil {
		return "", "", err
	}
	ret, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("the health script returned %s, not a table", L.Get(-1).Type())
	}
	return ret.RawGetString("status").String(), ret.RawGetString("message").String(), nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gitops-health LUA-SCRIPT < objects.json")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Kubernetes' own JSON decoding: whole numbers become int64, as in any object from the API.
	var objects []map[string]interface{}
	if err := k8sjson.Unmarshal(input, &objects); err != nil {
		fmt.Fprintln(os.Stderr, "decoding stdin:", err)
		os.Exit(1)
	}
	results := make([]result, 0, len(objects))
	for _, obj := range objects {
		res, err := status.Compute(&unstructured.Unstructured{Object: obj})
		if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus:", err)
			os.Exit(1)
		}
		argo, argoMessage, err := argoHealth(string(script), obj)
		if err != nil {
			fmt.Fprintln(os.Stderr, "lua:", err)
			os.Exit(1)
		}
		results = append(results, result{res.Status.String(), res.Message, argo, argoMessage})
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
