// Command list_and_predict lists the registered models of an aimass stack,
// then sends one Predict to a deployment and prints the first output tensor.
//
//	list_and_predict DEPLOYMENT [INPUT_NAME] [FEATURES]
//
// Addresses come from AIMASS_REGISTRY_ADDRESS / AIMASS_ROUTING_ADDRESS
// (default localhost:7105 / localhost:7106); AIMASS_API_KEY, when set, is
// sent as the x-api-key header. The input is one row of FEATURES float32
// values 0.1, 0.2, ... sent as raw little-endian bytes (the fast path). Exit
// status: 0 when both calls succeed, 1 on a failed call, 2 on bad arguments.
package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	commonv1 "github.com/aimass/aimass/clients/go/gen/aimass/common/v1"
	registryv1 "github.com/aimass/aimass/clients/go/gen/aimass/registry/v1"
	routingv1 "github.com/aimass/aimass/clients/go/gen/aimass/routing/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

// withKey adds the API key to every call when one is configured.
func withKey(ctx context.Context) context.Context {
	if key := os.Getenv("AIMASS_API_KEY"); key != "" {
		return metadata.AppendToOutgoingContext(ctx, "x-api-key", key)
	}
	return ctx
}

func dial(variable, fallback string) *grpc.ClientConn {
	// grpc.WithInsecure: plaintext, as the stack serves inside its network.
	conn, err := grpc.Dial(envOr(variable, fallback), grpc.WithInsecure())
	if err != nil {
		fmt.Fprintf(os.Stderr, "dial %s: %v\n", variable, err)
		os.Exit(1)
	}
	return conn
}

func listModels(ctx context.Context, conn *grpc.ClientConn) error {
	registry := registryv1.NewRegistryServiceClient(conn)
	response, err := registry.ListRegisteredModels(
		withKey(ctx), &registryv1.ListRegisteredModelsRequest{PageSize: 100})
	if err != nil {
		return fmt.Errorf("ListRegisteredModels failed: %w", err)
	}
	for _, model := range response.GetRegisteredModels() {
		fmt.Println("model", model.GetName())
	}
	return nil
}

func predict(ctx context.Context, conn *grpc.ClientConn, deployment, inputName string, features int) error {
	row := make([]byte, 4*features)
	for i := 0; i < features; i++ {
		binary.LittleEndian.PutUint32(row[4*i:], math.Float32bits(0.1*float32(i+1)))
	}
	request := &routingv1.PredictRequest{
		Deployment: deployment,
		Inputs: []*commonv1.InferTensor{
			{Name: inputName, Datatype: "FP32", Shape: []int64{1, int64(features)}},
		},
		RawInputContents: [][]byte{row},
	}
	response, err := routingv1.NewPredictionServiceClient(conn).Predict(withKey(ctx), request)
	if err != nil {
		return fmt.Errorf("Predict failed: %w", err)
	}
	if len(response.GetOutputs()) == 0 || len(response.GetRawOutputContents()) == 0 {
		return fmt.Errorf("Predict returned no raw output")
	}
	output := response.GetOutputs()[0]
	shape := make([]string, len(output.GetShape()))
	for i, dim := range output.GetShape() {
		shape[i] = strconv.FormatInt(dim, 10)
	}
	fmt.Printf("predict %s version=%s output=%s shape=[%s]\n", response.GetDeployment(),
		response.GetModelVersion(), output.GetName(), strings.Join(shape, ","))
	raw := response.GetRawOutputContents()[0]
	fmt.Print("values")
	for offset := 0; offset+4 <= len(raw); offset += 4 {
		fmt.Print(" ", math.Float32frombits(binary.LittleEndian.Uint32(raw[offset:])))
	}
	fmt.Println()
	return nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: list_and_predict DEPLOYMENT [INPUT_NAME] [FEATURES]")
		os.Exit(2)
	}
	inputName, features := "input", 8
	if len(os.Args) > 2 {
		inputName = os.Args[2]
	}
	if len(os.Args) > 3 {
		parsed, err := strconv.Atoi(os.Args[3])
		if err != nil || parsed <= 0 {
			fmt.Fprintln(os.Stderr, "FEATURES must be a positive integer")
			os.Exit(2)
		}
		features = parsed
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	registry := dial("AIMASS_REGISTRY_ADDRESS", "localhost:7105")
	defer registry.Close()
	routing := dial("AIMASS_ROUTING_ADDRESS", "localhost:7106")
	defer routing.Close()
	if err := listModels(ctx, registry); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := predict(ctx, routing, os.Args[1], inputName, features); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
